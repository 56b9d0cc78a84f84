"""`gpuwatch top`: in a real terminal (tmux, private server) against the real daemon, and its data shaping
without a terminal."""
from __future__ import annotations

import itertools
import os
import shlex
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import urwid

from conftest import GPUWATCH, Daemon, wait_for
from gpuwatch.core.protocol import ControlError, DaemonUnavailable
from gpuwatch.exporters import top

MiB = 1 << 20
GiB = 1 << 30
TOP = [sys.executable, "-m", "gpuwatch.exporters.top"]
TMUX = ["tmux", "-L", f"gwtest-{os.getpid()}", "-f", "/dev/null"]
_sessions = itertools.count()


class Terminal:
    """top in a detached session of a private tmux server; the session outlives top so that its exit code
    (and a traceback, should it crash) can be read."""

    def __init__(self, tmp_path: Path, socket: str, width: int, height: int, *args: str) -> None:
        self.name = f"top{next(_sessions)}"
        self.rc_file = tmp_path / f"{self.name}.rc"
        command = (f"{shlex.join([*TOP, '--socket', socket, *args])}; echo $? > {shlex.quote(str(self.rc_file))}; "
                   "sleep 600")
        env = {k: v for k, v in os.environ.items() if k != "TMUX"}
        subprocess.run([*TMUX, "new-session", "-d", "-s", self.name, "-x", str(width), "-y", str(height), command],
                       check=True, env=env, cwd=tmp_path)

    def __enter__(self) -> Terminal:
        return self

    def __exit__(self, *exc: object) -> None:
        subprocess.run([*TMUX, "kill-session", "-t", self.name], capture_output=True)

    def screen(self, join: bool = False) -> list[str]:
        out = subprocess.run([*TMUX, "capture-pane", "-p", *(["-J"] if join else []), "-t", self.name],
                             capture_output=True, text=True, check=True).stdout
        return out.split("\n")

    def keys(self, *keys: str) -> None:
        subprocess.run([*TMUX, "send-keys", "-t", self.name, *keys], check=True)

    def type(self, text: str) -> None:
        subprocess.run([*TMUX, "send-keys", "-l", "-t", self.name, text], check=True)

    def resize(self, width: int, height: int) -> None:
        subprocess.run([*TMUX, "resize-window", "-t", self.name, "-x", str(width), "-y", str(height)], check=True)

    def wait(self, predicate: Callable[[list[str]], Any], what: str, timeout: float = 10.0) -> Any:
        last: list[str] = []

        def check() -> Any:
            nonlocal last
            last = self.screen()
            return predicate(last)

        try:
            return wait_for(check, timeout, what)
        except AssertionError as exc:
            raise AssertionError(f"{exc}; the screen:\n" + "\n".join(last)) from None

    def exit_code(self) -> int | None:
        text = self.rc_file.read_text().strip() if self.rc_file.exists() else ""
        return int(text) if text else None


def table(lines: list[str]) -> tuple[list[str], list[dict[str, str]]]:
    """The column titles and the rows of the process table on a captured screen."""
    start = next((i for i, line in enumerate(lines) if line.split()[:1] == ["PID"]), None)
    if start is None:
        return [], []
    titles = lines[start].split()
    rows = []
    for line in lines[start + 1:]:
        cells = line.split(None, len(titles) - 1)
        if len(cells) == len(titles) and cells[0].isdigit():
            rows.append(dict(zip(titles, cells)))
    return titles, rows


def by_pid(lines: list[str]) -> dict[int, dict[str, str]]:
    return {int(r["PID"]): r for r in table(lines)[1]}


def order(lines: list[str], pids: list[int]) -> list[int]:
    return [int(r["PID"]) for r in table(lines)[1] if int(r["PID"]) in pids]


def showing(*pids: int) -> Callable[[list[str]], dict[int, dict[str, str]] | None]:
    def check(lines: list[str]) -> dict[int, dict[str, str]] | None:
        rows = by_pid(lines)
        return rows if all(p in rows for p in pids) else None
    return check


@pytest.fixture
def small_big(progs) -> tuple[Any, Any]:
    """Two programs, the smaller started first so that memory order and pid order differ."""
    small, big = progs("python"), progs()
    small.ok("alloc a 12M")
    big.ok("alloc a 300M")
    return small, big


def test_rows_sorted_by_memory_with_a_launch_rate(daemon, progs, small_big, tmp_path):
    small, big = small_big
    launcher = progs()
    launcher.ok("alloc a 1M")
    with Terminal(tmp_path, daemon.socket, 140, 30, "--interval", "0.5") as term:
        rows = term.wait(showing(small.pid, big.pid, launcher.pid), "the three programs")
        assert rows[big.pid]["DEVICE"] == "300.0MiB"
        assert rows[small.pid]["DEVICE"] == "12.0MiB"
        assert rows[launcher.pid]["DEVICE"] == "1.0MiB"
        assert rows[big.pid]["USER"] == "root" and rows[big.pid]["CONTAINER"] == "-"
        assert rows[big.pid]["COMMAND"] == "cudaprog"
        assert rows[small.pid]["COMMAND"].startswith("python")
        screen = term.screen()
        assert order(screen, [small.pid, big.pid, launcher.pid]) == [big.pid, small.pid, launcher.pid]
        assert table(screen)[0] == ["PID", "USER", "CONTAINER", "GPU", "DEVICE", "NVML", "UNTRACKED", "LAUNCH/S",
                                    "FAILED", "COMMAND"]
        assert "launches all" in screen[0] and "sort memory desc" in screen[0]
        assert any(line.startswith("GPU 0") and "(no NVML)" in line for line in screen)

        def launching(lines: list[str]) -> dict[str, str] | None:
            launcher.ok("launch 20000")
            row = by_pid(lines).get(launcher.pid)
            return row if row and row["LAUNCH/S"] not in ("-", "0.0") else None

        row = term.wait(launching, "a launch rate")
        assert float(row["LAUNCH/S"]) > 0
        assert by_pid(term.screen())[big.pid]["LAUNCH/S"] == "0.0"


def test_fits_80_columns_after_a_resize(daemon, small_big, tmp_path):
    small, big = small_big
    with Terminal(tmp_path, daemon.socket, 140, 30, "--interval", "0.5") as term:
        term.wait(showing(small.pid, big.pid), "both programs")
        term.resize(80, 30)
        rows = term.wait(lambda lines: "CONTAINER" not in table(lines)[0] and showing(small.pid, big.pid)(lines),
                         "the narrow table")
        assert rows[big.pid]["DEVICE"] == "300.0MiB" and rows[small.pid]["DEVICE"] == "12.0MiB"
        lines = term.screen(join=True)  # lines the terminal had to wrap come back whole
        assert max(len(line) for line in lines) <= 80, "\n".join(lines)
        titles = table(lines)[0]
        assert {"PID", "DEVICE", "LAUNCH/S", "COMMAND"} <= set(titles) and "UNTRACKED" not in titles
        for pid, size, command in ((big.pid, "300.0MiB", "cudaprog"), (small.pid, "12.0MiB", "python")):
            line = next(line for line in lines if line.split()[:1] == [str(pid)])
            assert size in line and command in line
        assert any("q quit" in line for line in lines)


def test_sort_reverse_and_filter_keys(daemon, small_big, tmp_path):
    small, big = small_big
    pids = [small.pid, big.pid]
    with Terminal(tmp_path, daemon.socket, 140, 30, "--interval", "0.5") as term:
        term.wait(lambda lines: order(lines, pids) == [big.pid, small.pid], "memory order")
        term.keys("p")
        term.wait(lambda lines: "sort pid asc" in lines[0] and order(lines, pids) == sorted(pids), "pid order")
        term.keys("r")
        term.wait(lambda lines: "sort pid desc" in lines[0] and order(lines, pids) == sorted(pids, reverse=True),
                  "reversed pid order")

        term.keys("/")
        term.wait(lambda lines: any(line.startswith("filter (Enter applies") for line in lines), "the prompt")
        term.type("CUDAPROG.py")
        term.keys("Enter")
        term.wait(lambda lines: "filter: CUDAPROG.py" in lines[0] and order(lines, pids) == [small.pid],
                  "only the Python program")

        term.keys("/")
        term.type("nothing-matches")
        term.keys("Escape")
        term.wait(lambda lines: any(line.startswith("q quit") for line in lines), "the prompt to close")
        screen = term.screen()
        assert "filter: CUDAPROG.py" in screen[0] and order(screen, pids) == [small.pid]

        term.keys("/", "C-u", "Enter")
        term.wait(lambda lines: "filter" not in lines[0] and order(lines, pids) == sorted(pids, reverse=True),
                  "the filter cleared")
        term.keys("-")
        term.wait(lambda lines: "every 0.2s" in lines[0], "a shorter interval")


def test_q_quits_with_exit_code_0(daemon, tmp_path):
    with Terminal(tmp_path, daemon.socket, 100, 20) as term:
        term.wait(lambda lines: lines[0].startswith("gpuwatch "), "the header")
        assert term.exit_code() is None
        term.keys("q")
        wait_for(lambda: term.exit_code() is not None, 10, "top to exit")
        assert term.exit_code() == 0


@pytest.mark.root
def test_survives_the_daemon_going_away_and_coming_back(tmp_path):
    workdir = tmp_path / "own"
    workdir.mkdir()
    own = Daemon(workdir, "--launches", "off")
    try:
        with Terminal(tmp_path, own.socket, 100, 20, "--interval", "0.3") as term:
            term.wait(lambda lines: "launches off" in lines[0], "the header")
            own.stop()
            screen = term.wait(lambda lines: "daemon unavailable" in lines[0] and lines, "the daemon to be missed")
            assert "sudo gpuwatch run" in " ".join(screen)
            own = Daemon(workdir, "--launches", "off")
            term.wait(lambda lines: "launches off" in lines[0], "the header back")
            assert term.exit_code() is None
    finally:
        own.stop()


def test_without_a_daemon_one_line_and_exit_1(tmp_path):
    result = subprocess.run([*TOP, "--socket", str(tmp_path / "none.sock")], capture_output=True, text=True,
                            timeout=30)
    assert result.returncode == 1
    assert result.stdout == ""
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("gpuwatch: ") and "sudo gpuwatch run" in lines[0], result.stderr


def test_the_cli_command_without_a_daemon(tmp_path):
    if subprocess.run([*GPUWATCH, "top", "--help"], capture_output=True).returncode != 0:
        pytest.skip("`gpuwatch top` is not wired into the command line yet")
    result = subprocess.run([*GPUWATCH, "--socket", str(tmp_path / "none.sock"), "top", "--interval", "0.5",
                             "--sort", "launches", "--filter", "x"], capture_output=True, text=True, timeout=30)
    assert result.returncode == 1 and result.stdout == ""
    assert result.stderr.count("\n") == 1 and "sudo gpuwatch run" in result.stderr
    assert subprocess.run([*GPUWATCH, "top", "--interval", "0"], capture_output=True).returncode == 2


def test_without_a_terminal_it_says_so(daemon):
    result = subprocess.run([*TOP, "--socket", daemon.socket], capture_output=True, text=True, timeout=30,
                            stdin=subprocess.DEVNULL)
    assert result.returncode == 1 and result.stdout == ""
    assert "needs a terminal" in result.stderr


# ---------------------------------------------------------------- data shaping, no terminal


def ps_row(pid: int, device: int = 0, gpu: int | None = 0, **kw: Any) -> dict[str, Any]:
    return {"pid": pid, "comm": kw.pop("comm", "train"), "gpu": gpu, "gpu_uuid": None, "user": "alice",
            "container_id": "", "pod_uid": "", "device_bytes": device, "managed_bytes": 0, "host_pinned_bytes": 0,
            "nvml_bytes": None, "untracked_bytes": 0, "allocs": 1, "frees": 0, "failed_allocs": 0, "launches": 0,
            "graph_launches": 0, "launches_estimated": False, "copy_bytes": {}, **kw}


HEALTH = {"launch_mode": "all", "libraries": ["/usr/lib/libcuda.so.1"], "probes_attached": 67, "events_lost": 0,
          "events_seen": 10, "waiting_for_driver": False, "nvml": True}


def status(gpus: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    return {"health": HEALTH, "gpus": gpus or [], "processes": 0}


def h200(index: int, used: int, utilization: int = 37) -> dict[str, Any]:
    return {"index": index, "uuid": f"GPU-{index}", "name": "NVIDIA H200", "memory_total": 80 * GiB,
            "memory_used": used, "utilization": utilization}


class Scripted:
    """A daemon's answers in turn, with a clock that moves by `step` seconds per refresh."""

    def __init__(self, *answers: Any, step: float = 2.0) -> None:
        self.answers, self.now, self.step = list(answers), 0.0, step

    def fetch(self) -> tuple[list[dict[str, Any]], dict[str, Any]]:
        answer = self.answers.pop(0)
        if isinstance(answer, Exception):
            raise answer
        return answer

    def clock(self) -> float:
        self.now += self.step
        return self.now

    def top(self, **view: Any) -> top.Top:
        return top.Top(self.fetch, top.ViewState(**view), clock=self.clock, commands=lambda pid, comm: comm)


def test_launch_rate_from_two_snapshots():
    first = [ps_row(1, launches=100), ps_row(2, launches=0, launches_estimated=True, comm="est")]
    second = [ps_row(1, launches=1100), ps_row(2, launches=800, launches_estimated=True, comm="est")]
    script = Scripted((first, status()), (second, status()), step=2.0)
    t = script.top()
    t.refresh()
    assert [r.launch_rate for r in t.rows] == [None, None]
    t.refresh()
    assert [r.launch_rate for r in t.rows] == [500.0, 400.0]
    lines = {r.pid: top.format_row(r, top.fit_columns(80)) for r in t.rows}
    assert " 500.0 " in lines[1] and " ~400.0 " in lines[2]


def test_launch_rate_resets_when_the_counter_goes_back():
    rates = top.LaunchRates()
    assert rates.update((7, 0), 1000, 1.0, False) is None
    assert rates.update((7, 0), 3000, 2.0, False) == 2000.0
    assert rates.update((7, 0), 10, 3.0, False) is None  # pid reused by a new process
    assert rates.update((7, 0), 110, 4.0, False) == 100.0


def test_estimated_launch_rate_spans_a_sample_period():
    rates = top.LaunchRates()
    counts = {0: 0, 1: 0, 2: 0, 3: 0, 4: 4000, 5: 4000, 6: 4000, 7: 4000, 8: 8000, 9: 8000}
    seen = {t: rates.update((1, 0), n, float(t), True) for t, n in counts.items()}
    assert seen[0] is None
    assert seen[4] == seen[5] == seen[8] == seen[9] == 1000.0  # not 0 between the daemon's samples


def test_column_fitting_drops_low_priority_columns():
    narrow = [(c.title, w) for c, w in top.fit_columns(80)]
    titles = [t for t, _ in narrow]
    assert {"PID", "DEVICE", "COMMAND", "LAUNCH/S"} <= set(titles)
    assert "CONTAINER" not in titles and "UNTRACKED" not in titles
    assert sum(w for _, w in narrow) + len(narrow) - 1 == 80

    wide = dict((c.title, w) for c, w in top.fit_columns(200))
    assert list(wide) == [c.title for c in top.COLUMNS]
    assert wide["COMMAND"] > 15 and sum(wide.values()) + len(wide) - 1 == 200

    tiny = [c.title for c, _ in top.fit_columns(30)]
    assert tiny == ["PID", "DEVICE", "COMMAND"]


def test_no_line_is_wider_than_the_terminal():
    rows = [ps_row(4194304, 1023 * GiB, comm="a-very-long-comm", container_id="f" * 64, failed_allocs=123456,
                   launches=10**12, nvml_bytes=1025 * GiB, untracked_bytes=2 * GiB, user="someone-long-name"),
            ps_row(5, 3 * MiB, gpu=None, pod_uid="0123456789abcdef")]
    gpus = [h200(0, 70 * GiB), {**h200(1, 0), "name": "x" * 60, "utilization": None}]
    for width in range(12, 220, 3):
        for answer in ((rows, status(gpus)), (rows, status())):
            t = Scripted(answer, answer, step=1e-3).top(filter="")
            t.refresh()
            t.refresh()
            t.view.filter = "some filter text"
            lines = [top.plain(line) for line in t.header_lines(width)]
            lines += [top.row_line(r, width) for r in t.rows]
            lines.append(top.plain(top.footer_line(width)))
            assert len(lines) == (8 if answer[1]["gpus"] else 7)  # state, GPUs, titles, 2 rows, keys
            assert [line for line in lines if len(line) > width] == []
        error = top.error_lines("no gpuwatch daemon is listening on /run/x.sock: start one", top.ViewState(), width)
        assert all(len(top.plain(line)) <= width for line in error)


def test_rendered_screen_keeps_every_row_on_one_line():
    t = Scripted(([ps_row(11, 5 * MiB, comm="c" * 15), ps_row(22, 9 * MiB)], status([h200(0, 10 * GiB)]))).top()
    t.refresh()
    app = top.TopApp(t)
    for width in (80, 50, 140):
        text = [line.decode().rstrip() for line in app.frame.render((width, 12)).text]
        assert text[0].startswith("gpuwatch")
        assert text[1].startswith("GPU 0") and "[" in text[1]
        pid_lines = [line for line in text if line.split()[:1] in (["11"], ["22"])]
        assert [line.split()[0] for line in pid_lines] == ["22", "11"]
        assert "9.0MiB" in pid_lines[0] and "c" * 15 in pid_lines[1]


def test_container_column():
    assert top.container_label("0123456789abcdef0123", "") == "0123456789ab"
    assert top.container_label("", "8a1b2c3d-0000-1111") == "pod:8a1b2c3d"
    assert top.container_label("0123456789abcdef", "8a1b2c3d") == "0123456789ab"
    assert top.container_label("", "") == "-"


def test_sorting_and_filtering():
    data = [ps_row(30, 5 * MiB, comm="python", failed_allocs=2),
            ps_row(10, 50 * MiB, comm="Trainer", user="bob", container_id="abc123def4567890"),
            ps_row(20, 1 * MiB, comm="bench", pod_uid="feed0000-1111")]
    rows = [top.make_row(d, None, d["comm"]) for d in data]
    pids = lambda rs: [r.pid for r in rs]  # noqa: E731
    assert pids(top.sort_rows(rows, "memory")) == [10, 30, 20]
    assert pids(top.sort_rows(rows, "memory", reverse=True)) == [20, 30, 10]
    assert pids(top.sort_rows(rows, "pid")) == [10, 20, 30]
    assert pids(top.sort_rows(rows, "failed")) == [30, 10, 20]
    assert pids(top.sort_rows(rows, "command")) == [20, 30, 10]
    assert pids(top.sort_rows(rows, "container")) == [30, 10, 20]  # "-" < "abc..." < "pod:..."
    assert pids(top.filter_rows(rows, "trainer")) == [10]
    assert pids(top.filter_rows(rows, "BOB")) == [10]
    assert pids(top.filter_rows(rows, "def456")) == [10]  # beyond the 12 characters shown
    assert pids(top.filter_rows(rows, "feed")) == [20]
    assert pids(top.filter_rows(rows, "0")) == [30, 10, 20]
    assert pids(top.filter_rows(rows, "3")) == [30, 10]
    assert pids(top.filter_rows(rows, "")) == [30, 10, 20]


def test_gpu_lines_with_and_without_nvml():
    summaries = top.gpu_summaries([ps_row(1, 8 * GiB, untracked_bytes=500 * MiB), ps_row(2, 2 * GiB),
                                   ps_row(3, 4 * GiB, gpu=1)], [h200(0, 20 * GiB), h200(1, 4 * GiB, 0)])
    assert [(s.index, s.traced, s.untracked) for s in summaries] == [(0, 10 * GiB, 500 * MiB), (1, 4 * GiB, 0)]
    lines = [top.plain(line) for line in top.gpu_lines(summaries, 140)]
    assert lines[0].startswith("GPU 0 NVIDIA H200 [") and lines[1].startswith("GPU 1 NVIDIA H200 [")
    assert lines[0].index("]") == lines[1].index("]")
    assert "traced 10.0GiB" in lines[0] and "untracked 500.0MiB" in lines[0] and "free 60.0GiB of 80.0GiB" in lines[0]
    assert lines[0].endswith("util 37%") and lines[1].endswith("util 0%")

    bar = top.plain(top.memory_bar(top.GpuSummary(0, 10, 20, total=100, used=50), 10))
    assert bar == "#++--....."
    assert top.plain(top.memory_bar(top.GpuSummary(0, 1, 0, total=10**6, used=1), 10)) == "#........."

    no_nvml = [top.plain(line) for line in
               top.gpu_lines(top.gpu_summaries([ps_row(1, 12 * MiB), ps_row(2, 1 * MiB, gpu=None)], []), 80)]
    assert no_nvml == ["GPU 0  traced 12.0MiB  (no NVML)", "GPU -  traced 1.0MiB  (GPU not known)"]


def test_daemon_going_away_shows_in_the_header_and_recovers():
    rows = [ps_row(1, 5 * MiB)]
    script = Scripted((rows, status()), DaemonUnavailable("no daemon: start one with `sudo gpuwatch run`"),
                      ControlError("the daemon closed the connection"), ([{"pid": 1}], status()), (rows, status()))
    t = script.top()
    t.refresh()
    assert [r.pid for r in t.rows] == [1]
    t.refresh()
    assert t.rows == [] and top.plain(t.header_lines(120)[0]).startswith(
        "gpuwatch  daemon unavailable: no daemon: start one with `sudo gpuwatch run`")
    t.refresh()
    assert "the daemon closed the connection" in top.plain(t.header_lines(120)[0])
    t.refresh()
    assert "unexpected answer from the daemon (KeyError: 'gpu')" in top.plain(t.header_lines(120)[0])
    t.refresh()
    assert t.error is None and [r.pid for r in t.rows] == [1]
    with pytest.raises(DaemonUnavailable):
        Scripted(DaemonUnavailable("x")).top().refresh(strict=True)


def test_keys_change_the_view():
    t = Scripted(([ps_row(1, 5 * MiB, comm="alpha"), ps_row(2, 9 * MiB, comm="beta")], status())).top()
    t.refresh()
    app = top.TopApp(t)
    size = (100, 20)

    def press(*keys: str) -> None:
        for key in keys:
            if app.frame.keypress(size, key) is not None:
                app.on_key(key)

    def shown() -> list[int]:
        return [r.pid for r in t.visible()]

    assert shown() == [2, 1]
    press("p")
    assert (t.view.sort, t.view.reverse, shown()) == ("pid", False, [1, 2])
    press("r")
    assert shown() == [2, 1]
    press("n")
    assert (t.view.sort, t.view.reverse, shown()) == ("command", False, [1, 2])
    press("/", "b", "e", "enter")
    assert (t.view.filter, shown()) == ("be", [2])
    press("/", "x", "esc")
    assert t.view.filter == "be"
    press("/", "backspace", "backspace", "enter")
    assert (t.view.filter, shown()) == ("", [1, 2])
    press("/", "q")  # typed into the prompt, not a quit
    press("esc")
    for key in ("q", "Q", "esc"):
        with pytest.raises(urwid.ExitMainLoop):
            press(key)


def test_interval_steps_and_option():
    assert top.next_interval(1.0, longer=False) == 0.5
    assert top.next_interval(0.5, longer=False) == 0.2
    assert top.next_interval(0.2, longer=False) == 0.2
    assert top.next_interval(0.1, longer=False) == 0.1
    assert top.next_interval(1.0, longer=True) == 2.0
    assert top.next_interval(1.5, longer=True) == 2.0
    assert top.parser().parse_args(["--interval", "0.3", "--sort", "launches"]).interval == 0.3
    for bad in (["--interval", "0"], ["--interval", "-1"], ["--interval", "nan"], ["--sort", "size"]):
        with pytest.raises(SystemExit):
            top.parser().parse_args(bad)
    assert top.parser().parse_args([]).sort == "memory"
