"""Prometheus metrics: a real Prometheus server scrapes a running daemon while test programs allocate."""
from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import time
import urllib.parse
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from conftest import FAKECUDA_SRC, GPUWATCH, Daemon, Prog, wait_for

MiB = 1 << 20
ROOT = FAKECUDA_SRC.parent.parent
DASHBOARD = ROOT / "exporters" / "grafana" / "gpuwatch.json"
GPU0_UUID = "GPU-66616b65-6375-6461-2d64-657630303030"  # what the test-double libcuda reports for device 0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def fakenvml(tmp_path_factory) -> tuple[Path, Path]:
    out = tmp_path_factory.mktemp("fakenvml")
    subprocess.run(["make", "-s", "-C", str(ROOT / "tests" / "fakenvml"), f"OUT={out}"], check=True)
    state = out / "state"
    write_atomically(state, f"gpu 0 {GPU0_UUID} {80 << 30} 37 Fake H200\n"
                     "gpu 1 GPU-99999999-8888-7777-6666-555555555555 "
                     f"{80 << 30} 0 Fake H200\n")
    return out, state


def write_atomically(path: Path, text: str) -> None:
    """The daemon may read the file at any moment: it must see the old contents or the new."""
    tmp = path.with_suffix(".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


class MetricsDaemon(Daemon):
    def __init__(self, workdir: Path, fakenvml: tuple[Path, Path]) -> None:
        self.port = free_port()
        lib_dir, state = fakenvml
        os.environ["LD_LIBRARY_PATH"], os.environ["FAKENVML_STATE"] = str(lib_dir), str(state)
        try:
            super().__init__(workdir, "--launches", "all", "--listen", f"127.0.0.1:{self.port}", nvml=True)
        finally:
            del os.environ["LD_LIBRARY_PATH"], os.environ["FAKENVML_STATE"]

    def scrape(self) -> str:
        return urllib.request.urlopen(f"http://127.0.0.1:{self.port}/metrics", timeout=10).read().decode()


@pytest.fixture(scope="module")
def mdaemon(tmp_path_factory, fakenvml) -> Iterator[MetricsDaemon]:
    d = MetricsDaemon(tmp_path_factory.mktemp("mdaemon"), fakenvml)
    yield d
    d.stop()


class Prometheus:
    def __init__(self, workdir: Path, target_port: int) -> None:
        self.port = free_port()
        config = workdir / "prometheus.yml"
        config.write_text("global: {scrape_interval: 1s, evaluation_interval: 1s}\nscrape_configs:\n"
                          f"  - job_name: gpuwatch\n    static_configs: [{{targets: ['127.0.0.1:{target_port}']}}]\n")
        self.proc = subprocess.Popen(["prometheus", f"--config.file={config}", f"--storage.tsdb.path={workdir}/data",
                                      f"--web.listen-address=127.0.0.1:{self.port}", "--log.level=warn"],
                                     stdout=subprocess.DEVNULL, stderr=(workdir / "prometheus.log").open("w"))
        wait_for(self.ready, 30, "Prometheus to be ready")

    def ready(self) -> bool:
        try:
            return urllib.request.urlopen(f"http://127.0.0.1:{self.port}/-/ready", timeout=2).status == 200
        except OSError:
            return False

    def query(self, promql: str) -> list[dict]:
        url = f"http://127.0.0.1:{self.port}/api/v1/query?" + urllib.parse.urlencode({"query": promql})
        body = json.loads(urllib.request.urlopen(url, timeout=10).read())
        assert body["status"] == "success", body
        return body["data"]["result"]

    def value(self, promql: str) -> float | None:
        result = self.query(promql)
        return float(result[0]["value"][1]) if len(result) == 1 else None


@pytest.fixture(scope="module")
def prometheus(tmp_path_factory, mdaemon) -> Iterator[Prometheus]:
    p = Prometheus(tmp_path_factory.mktemp("prometheus"), mdaemon.port)
    yield p
    p.proc.terminate()
    p.proc.wait(timeout=10)


@pytest.fixture
def mprogs(fakecuda, mdaemon):
    started: list[Prog] = []

    def start() -> Prog:
        p = Prog([str(fakecuda / "cudaprog")])
        started.append(p)
        p.ok(f"load {fakecuda / 'libcuda.so.1'}")
        wait_for(lambda: mdaemon.watching(fakecuda / "libcuda.so.1"), 5, "attach")
        p.ok("uuid 0")
        p.ok("ctx 0")
        return p

    yield start
    for p in started:
        p.close()


def set_nvml(fakenvml, procs: dict[int, int]) -> None:
    _, state = fakenvml
    gpus = [line for line in state.read_text().splitlines() if line.startswith("gpu ")]
    write_atomically(state, "\n".join(gpus + [f"proc {pid} 0 {used}" for pid, used in procs.items()]) + "\n")


def test_prometheus_sees_exact_bytes_that_ps_shows(mdaemon, prometheus, mprogs, fakenvml):
    a, b = mprogs(), mprogs()
    a.ok("alloc x 12M")
    b.ok("alloc y 300M")
    b.ok("managed m 5M")
    b.ok("hostalloc h 3M")
    assert b.send("alloc huge 100G") == "err 2"
    set_nvml(fakenvml, {a.pid: 12 * MiB + 500 * MiB, b.pid: 300 * MiB + 500 * MiB})
    sel = lambda p: f'{{pid="{p.pid}",gpu="0",gpu_uuid="{GPU0_UUID}"}}'  # noqa: E731
    expected = {f"gpuwatch_process_device_memory_bytes{sel(a)}": 12 * MiB,
                f"gpuwatch_process_device_memory_bytes{sel(b)}": 300 * MiB,
                f"gpuwatch_process_managed_memory_bytes{sel(b)}": 5 * MiB,
                f"gpuwatch_process_host_pinned_memory_bytes{sel(b)}": 3 * MiB,
                f"gpuwatch_process_nvml_memory_bytes{sel(b)}": 800 * MiB,
                f"gpuwatch_process_untracked_memory_bytes{sel(b)}": 500 * MiB,
                f"gpuwatch_process_allocation_failures_total{sel(b)}": 1,
                'gpuwatch_gpu_memory_total_bytes{gpu="0"}': 80 << 30,
                'gpuwatch_gpu_utilization_ratio{gpu="0"}': 0.37}
    for promql, value in expected.items():
        wait_for(lambda: prometheus.value(promql) == value, 15, f"{promql} == {value}")
    rows = {r["pid"]: r for r in mdaemon.ps()}
    assert (rows[a.pid]["device_bytes"], rows[b.pid]["untracked_bytes"]) == (12 * MiB, 500 * MiB)


def test_exposition_is_clean_for_promtool(mdaemon, mprogs):
    p = mprogs()
    p.ok("alloc x 1M")
    exposition = mdaemon.scrape()
    assert f'pid="{p.pid}"' in exposition
    lint = subprocess.run(["promtool", "check", "metrics"], input=exposition, capture_output=True, text=True)
    assert lint.returncode == 0 and lint.stdout.strip() == "" and lint.stderr.strip() == "", lint.stdout + lint.stderr


def test_series_of_an_exited_process_vanish(mdaemon, prometheus, mprogs):
    p = mprogs()
    p.ok("alloc x 2M")
    promql = f'gpuwatch_process_device_memory_bytes{{pid="{p.pid}"}}'
    wait_for(lambda: prometheus.value(promql) == 2 * MiB, 15, "the series")
    p.proc.stdin.write("exit 0\n")
    p.proc.stdin.flush()
    p.proc.wait(timeout=5)
    assert f'pid="{p.pid}"' not in mdaemon.scrape()
    wait_for(lambda: prometheus.query(promql) == [], 10, "Prometheus to mark the series stale")


def test_every_dashboard_expression_returns_data(mdaemon, prometheus, mprogs, fakenvml):
    p = mprogs()
    p.ok("alloc x 8M")
    set_nvml(fakenvml, {p.pid: 600 * MiB})
    assert p.send("alloc big 100G") == "err 2"
    deadline = time.monotonic() + 30
    exprs = [(panel["title"], t["expr"]) for panel in json.loads(DASHBOARD.read_text())["panels"]
             for t in panel["targets"]]
    pending = dict(exprs)
    while pending and time.monotonic() < deadline:
        p.ok("launch 500")
        for title, expr in list(pending.items()):
            promql = expr.replace("$__rate_interval", "10s").replace("$instance", ".*")
            if prometheus.query(promql):
                pending.pop(title)
        time.sleep(0.5)
    assert not pending, f"panels without data: {pending}"
    assert len(exprs) >= 6


def test_sigterm_with_metrics_on_stops_within_two_seconds(tmp_path, fakenvml):
    d = MetricsDaemon(tmp_path, fakenvml)
    assert "gpuwatch_probes_attached" in d.scrape()
    start = time.monotonic()
    assert d.stop(signal.SIGTERM) == 0
    assert time.monotonic() - start < 2.0 and not os.path.exists(d.socket)
    with pytest.raises(OSError):
        d.scrape()


@pytest.mark.root
@pytest.mark.parametrize("text, message", [
    ("[daemon]\nlaunches = 'most'\n", "daemon.launches: must be one of all, sample, off, not 'most'"),
    ("[metrics]\nlisten = 'localhost'\n", "metrics.listen: must be HOST:PORT"),
    ("[daemon]\nring_buffer_pages = 3\n", "daemon.ring_buffer_pages: must be a power of two from 1 to 65536, not 3"),
    ("[daemon]\nnvml = 'yes'\n", "daemon.nvml: must be bool, not str 'yes'"),
    ("[daemon]\ncolour = 1\n", "daemon.colour: unknown key"),
    ("[enforcer]\n", "[enforcer]: unknown section"),
    ("[daemon\n", "invalid TOML"),
    ("[daemon]\nsample_window_ms = 500\nsample_period_ms = 500\n", "daemon.sample_window_ms: must be shorter"),
    ("[daemon]\nsample_period_ms = 0\n", "daemon.sample_period_ms: must be from 2 to 3600000, not 0"),
])
def test_bad_configuration_stops_start_up_with_one_line(tmp_path, text, message):
    cfg = tmp_path / "gpuwatch.toml"
    cfg.write_text(text)
    r = subprocess.run([*GPUWATCH, "--socket", str(tmp_path / "s.sock"), "run", "--config", str(cfg)],
                       capture_output=True, text=True, timeout=30)
    assert r.returncode == 1
    assert r.stderr.count("\n") == 1 and r.stderr.startswith(f"gpuwatch: {cfg}: ") and message in r.stderr, r.stderr
    assert not os.path.exists(tmp_path / "s.sock")


@pytest.mark.root
def test_configuration_file_is_applied_and_options_win(tmp_path):
    port = free_port()
    cfg = tmp_path / "gpuwatch.toml"
    cfg.write_text(f"[daemon]\nlaunches = 'off'\nsocket = '{tmp_path}/from-config.sock'\n"
                   f"[metrics]\nlisten = '127.0.0.1:{port}'\n")
    proc = subprocess.Popen([*GPUWATCH, "run", "--no-nvml", "--config", str(cfg), "--launches", "all"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_for(lambda: os.path.exists(tmp_path / "from-config.sock"), 30, "the configured socket")
        exposition = wait_for(lambda: _try_scrape(port), 10, "metrics on the configured port")
        assert re.search(r'gpuwatch_launch_mode\{mode="all"\} 1\.0', exposition)
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=10)


def _try_scrape(port: int) -> str | None:
    try:
        return urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=2).read().decode()
    except OSError:
        return None


def test_fast_exposition_equals_prometheus_client_reference():
    from prometheus_client import CollectorRegistry, generate_latest
    from gpuwatch.exporters.metrics import families, render
    from gpuwatch.core.view import Gpu, ProcessGpu, Snapshot, TracerHealth
    rows = [ProcessGpu(pid=10 + i, comm='we"ird\\na\nme', gpu=None if i == 3 else i % 2, gpu_uuid="GPU-1",
                       container_id="c" * 64 if i % 3 == 0 else "", pod_uid="p" if i == 4 else "", device_bytes=i << 20,
                       nvml_bytes=None if i % 2 else 5 << 30, allocs=i, launches=7 * i,
                       copy_bytes={"h2d": i, "d2h": 0, "d2d": 2, "any": 0}) for i in range(6)]
    snap = Snapshot(rows, [Gpu(0, "GPU-1", "H200", 10, 4, 30), Gpu(1)], TracerHealth("sample", libraries=["x"]))

    class Reference:
        def collect(self):
            return families(snap)

    registry = CollectorRegistry(auto_describe=False)
    registry.register(Reference())
    assert render(snap) == generate_latest(registry).decode()
