"""Prometheus metrics read from the one view at each scrape, so an exited process's series are
gone by the next one, and no label carries an address or a kernel name.

`families()` describes every metric with prometheus-client's types and is the reference. The scrape
endpoint writes the same samples with `render()`: prometheus-client's generic formatter took about 11 µs
a sample (270 ms for 1000 processes on two GPUs), `render()` formats each row's labels once. A test
checks that both give the same samples."""
from __future__ import annotations

import logging
import socket
import sys
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.exposition import CONTENT_TYPE_LATEST
from prometheus_client.utils import floatToGoString

from ..core import threads
from ..core.view import ProcessGpu, Snapshot
from ..core.vocabulary import COPY_DIRECTIONS, STATES, reason_kind

PROCESS_LABELS = ["pid", "comm", "gpu", "gpu_uuid", "container_id", "pod_uid", "namespace", "pod", "container"]
GPU_LABELS = ["gpu", "gpu_uuid", "name"]
log = logging.getLogger(__name__)

# (name, help, kind, value of a row); kind "counter" names end in _total in the exposition
PROCESS_METRICS: list[tuple[str, str, str, Callable[[ProcessGpu], float | None]]] = [
    ("gpuwatch_process_device_memory_bytes", "Device memory the process holds on the GPU: plain, pitched, "
     "async/pool and VMM physical allocations", "gauge", lambda r: r.device_bytes),
    ("gpuwatch_process_managed_memory_bytes", "Managed (unified) memory the process allocated", "gauge",
     lambda r: r.managed_bytes),
    ("gpuwatch_process_host_pinned_memory_bytes", "Pinned host memory the process allocated through the driver",
     "gauge", lambda r: r.host_pinned_bytes),
    ("gpuwatch_process_nvml_memory_bytes", "Device memory NVML reports for the process", "gauge",
     lambda r: r.nvml_bytes),
    ("gpuwatch_process_untracked_memory_bytes", "NVML's figure minus traced device memory: the CUDA context and "
     "memory allocated before gpuwatch attached", "gauge", lambda r: r.untracked_bytes),
    ("gpuwatch_process_allocations", "Successful allocations", "counter", lambda r: r.allocs),
    ("gpuwatch_process_allocation_failures", "Allocations the driver refused", "counter", lambda r: r.failed_allocs),
    ("gpuwatch_process_launches", "Kernel launches (estimated in sample mode)", "counter", lambda r: r.launches),
    ("gpuwatch_process_graph_launches", "CUDA graph launches (estimated in sample mode)", "counter",
     lambda r: r.graph_launches),
    ("gpuwatch_process_quota_bytes", "Device memory quota of the process (or of its quota group), per GPU",
     "gauge", lambda r: r.quota_bytes),
    ("gpuwatch_process_quota_pauses", "Times the process was stopped (SIGSTOP) before an allocation past its quota "
     "(on its first GPU's row)", "counter", lambda r: r.quota_pauses if r.quota_bytes is not None or r.quota_pauses
     else None),
    ("gpuwatch_process_swapped_bytes", "Device memory of a process under the interposer now held in host memory",
     "gauge", lambda r: r.swapped_bytes if r.interposed else None),
    ("gpuwatch_process_swap_pinned_bytes", "Pinned host memory the process's interposer holds for swapping (on its "
     "first GPU's row)", "gauge", lambda r: r.swap_pinned_bytes if r.interposed else None),
    ("gpuwatch_process_slice_seconds", "Time the process ran while the scheduler sliced its GPU (on its first GPU's "
     "row)", "counter", lambda r: r.slice_seconds if r.interposed or r.slice_seconds else None),
    ("gpuwatch_process_wait_seconds", "Time the process waited for its turn on the GPU (on its first GPU's row)",
     "counter", lambda r: r.wait_seconds if r.interposed or r.wait_seconds else None),
    ("gpuwatch_process_preemptions", "Times the scheduler paused, swapped out or stopped the process (on its first "
     "GPU's row)", "counter", lambda r: r.preemptions if r.interposed or r.preemptions else None),
]

# (name, help, kind, extra label, its values and the value of each for a row); kind as above
LABELLED_METRICS: list[tuple[str, str, str, str, Callable[[ProcessGpu], list[tuple[str, float]]]]] = [
    ("gpuwatch_process_copy_bytes", "Bytes copied by the process, by direction (any: unified-address copies); a "
     "direction appears once used", "counter", "direction",
     lambda r: [(d, r.copy_bytes[d]) for d in COPY_DIRECTIONS if r.copy_bytes[d]]),
    ("gpuwatch_process_swap_bytes", "Bytes a process under the interposer moved out to host memory and back in "
     "(on its first GPU's row)", "counter", "direction",
     lambda r: [("out", r.swap_out_bytes_total), ("in", r.swap_in_bytes_total)] if r.interposed else []),
    ("gpuwatch_process_state", "What the process is doing (1 for the current state): paused and swap states under "
     "the interposer or the driver's lock, stopped when paused with SIGSTOP, checkpointed when the driver holds "
     "its memory in host memory", "gauge", "state",
     lambda r: [(s, 1 if s == r.state else 0) for s in STATES]),
    ("gpuwatch_process_waiting", "1 while the process does not run, labelled with why (on each of its rows): "
     "paused_by_hand, quota, waiting_for_device_memory, waiting_for_host_memory, preempted, slice, exclusive",
     "gauge", "reason", lambda r: [(reason_kind(r.reason), 1)] if r.reason else []),
]


def _gpu_label(gpu: int | None) -> str:
    return "unknown" if gpu is None else str(gpu)


def _row_values(r: ProcessGpu) -> list[str]:
    """PROCESS_LABELS' values: one series per process and GPU, gone when the process is (Kubernetes' names are
    its container's: they add no series)."""
    return [str(r.pid), r.comm, _gpu_label(r.gpu), r.gpu_uuid or "", r.container_id, r.pod_uid, r.namespace, r.pod,
            r.container]


def families(snap: Snapshot) -> Iterator[Metric]:
    for name, doc, kind, value in PROCESS_METRICS:
        family = (CounterMetricFamily if kind == "counter" else GaugeMetricFamily)(name, doc, labels=PROCESS_LABELS)
        for r in snap.processes:
            v = value(r)
            if v is not None:
                family.add_metric(_row_values(r), v)
        yield family
    for name, doc, kind, label, values in LABELLED_METRICS:
        family = (CounterMetricFamily if kind == "counter" else GaugeMetricFamily)(name, doc,
                                                                                   labels=[*PROCESS_LABELS, label])
        for r in snap.processes:
            for label_value, v in values(r):
                family.add_metric([*_row_values(r), label_value], v)
        yield family
    yield from _non_process_families(snap)


def _non_process_families(snap: Snapshot) -> Iterator[Metric]:
    total = GaugeMetricFamily("gpuwatch_gpu_memory_total_bytes", "GPU memory size (NVML)", labels=GPU_LABELS)
    used = GaugeMetricFamily("gpuwatch_gpu_memory_used_bytes", "GPU memory in use (NVML)", labels=GPU_LABELS)
    util = GaugeMetricFamily("gpuwatch_gpu_utilization_ratio", "Fraction of the last sample period a kernel ran "
                             "(NVML)", labels=GPU_LABELS)
    for g in snap.gpus:
        labels = [str(g.index), g.uuid or "", g.name or ""]
        if g.memory_total is not None:
            total.add_metric(labels, g.memory_total)
            used.add_metric(labels, g.memory_used or 0)
        if g.utilization is not None:
            util.add_metric(labels, g.utilization / 100)
    yield from (total, used, util)

    if snap.scheduler is not None:
        waits = snap.scheduler
        buckets = [*((floatToGoString(b), n) for b, n in waits.wait_buckets), ("+Inf", waits.wait_count)]
        yield HistogramMetricFamily("gpuwatch_scheduler_wait_seconds", "How long processes waited for their turn "
                                    "on a sliced GPU", buckets=buckets, sum_value=waits.wait_sum)

    if (host := snap.host) is not None:
        yield GaugeMetricFamily("gpuwatch_host_memory_available_bytes", "Host memory the kernel says is available "
                                "(MemAvailable)", value=host.available_bytes)
        yield GaugeMetricFamily("gpuwatch_host_memory_reserve_bytes", "Host memory never used for swapped-out "
                                "memory", value=host.reserve_bytes)
        yield GaugeMetricFamily("gpuwatch_host_swap_pinned_bytes", "Pinned host memory interposed processes hold for "
                                "swapping (swapped-out memory and kept buffers)", value=host.pinned_bytes)
        yield GaugeMetricFamily("gpuwatch_host_swap_spare_bytes", "Pinned host memory swapping may still take (the "
                                "budget left)", value=host.spare_bytes)

    h = snap.health
    yield CounterMetricFamily("gpuwatch_events_lost", "Events dropped because the ring buffer was full "
                              "(accounting stays exact)", value=h.events_lost)
    yield CounterMetricFamily("gpuwatch_events", "Events read from the ring buffer", value=h.events_seen)
    yield GaugeMetricFamily("gpuwatch_libraries_watched", "libcuda files with probes attached",
                            value=len(h.libraries))
    yield GaugeMetricFamily("gpuwatch_probes_attached", "Uprobes attached", value=h.probes_attached)
    yield GaugeMetricFamily("gpuwatch_processes_traced", "Processes with traced GPU use",
                            value=len({r.pid for r in snap.processes}))
    mode = GaugeMetricFamily("gpuwatch_launch_mode", "Launch probe mode in use (1 for the current one)",
                             labels=["mode"])
    for m in ("all", "sample", "off"):
        mode.add_metric([m], 1 if m == h.launch_mode else 0)
    yield mode
    restarts = CounterMetricFamily("gpuwatch_thread_restarts", "Times a daemon thread failed and was started "
                                   "again (a thread appears once it has failed)", labels=["thread"])
    for name, n in sorted(h.thread_restarts.items()):
        restarts.add_metric([name], n)
    yield restarts


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _labels(names: list[str], values: list[str]) -> str:
    return ",".join(f'{n}="{_escape(v)}"' for n, v in sorted(zip(names, values)))


def render(snap: Snapshot) -> str:
    """The text exposition format (0.0.4) of everything families() yields, in the same order."""
    out: list[str] = []
    row_values = [_row_values(r) for r in snap.processes]
    row_labels = [_labels(PROCESS_LABELS, values) for values in row_values]
    for name, doc, kind, value in PROCESS_METRICS:
        sample = f"{name}_total" if kind == "counter" else name
        out.append(f"# HELP {sample} {_escape_help(doc)}\n# TYPE {sample} {kind}\n")
        for r, labels in zip(snap.processes, row_labels):
            v = value(r)
            if v is not None:
                out.append(f"{sample}{{{labels}}} {floatToGoString(v)}\n")
    for name, doc, kind, label, values in LABELLED_METRICS:
        sample = f"{name}_total" if kind == "counter" else name
        out.append(f"# HELP {sample} {_escape_help(doc)}\n# TYPE {sample} {kind}\n")
        for r, row in zip(snap.processes, row_values):
            for label_value, v in values(r):
                labels = _labels([*PROCESS_LABELS, label], [*row, label_value])
                out.append(f"{sample}{{{labels}}} {floatToGoString(v)}\n")
    for family in _non_process_families(snap):
        out.append(_render_family(family))
    return "".join(out)


def _escape_help(doc: str) -> str:
    return doc.replace("\\", "\\\\").replace("\n", "\\n")


def _render_family(family: Metric) -> str:
    kind = family.type
    name = f"{family.name}_total" if kind == "counter" else family.name
    lines = [f"# HELP {name} {_escape_help(family.documentation)}\n# TYPE {name} {kind}\n"]
    for s in family.samples:
        if s.name.endswith("_created"):
            continue
        labels = _labels(list(s.labels), list(s.labels.values()))
        lines.append(f"{s.name}{{{labels}}} {floatToGoString(s.value)}\n" if labels
                     else f"{s.name} {floatToGoString(s.value)}\n")
    return "".join(lines)


METRICS_CONNECTIONS = 64  # connections at once: a new one beyond closes the oldest that has not sent its request
METRICS_TIMEOUT_S = 10.0  # a request must arrive, and its answer be taken, within this long
LOG_EVERY_S = 60.0        # failed connections are logged at most once this often


class _HttpServer(ThreadingHTTPServer):
    """Bounded: at most METRICS_CONNECTIONS connections (and threads); idle ones make room for new ones, so a
    scrape gets through any number of connections that send nothing; out of file descriptors it backs off."""
    daemon_threads = True
    block_on_close = False
    request_queue_size = 1024

    def __init__(self, address: tuple[str, int], handler: type[BaseHTTPRequestHandler]) -> None:
        self.address_family = socket.AF_INET6 if ":" in address[0] else socket.AF_INET
        self._open: OrderedDict[Any, bool] = OrderedDict()  # connection -> answering a request
        self._lock = threading.Lock()
        self._logged = -LOG_EVERY_S
        super().__init__(address, handler)

    def get_request(self) -> tuple[Any, Any]:
        return threads.accept_or_wait(super().get_request,
                              lambda exc: self._log("metrics: cannot accept a connection: %s", exc.strerror))

    def verify_request(self, request: Any, client_address: Any) -> bool:
        with self._lock:
            victim = None
            if len(self._open) >= METRICS_CONNECTIONS:
                victim = next((c for c, busy in self._open.items() if not busy), None)
                if victim is None:
                    return False  # every one is being answered: this one is closed
                del self._open[victim]
            self._open[request] = False
        if victim is not None:
            try:
                victim.shutdown(socket.SHUT_RDWR)  # its thread reads the end and closes it
            except OSError:
                pass
        return True

    def answering(self, request: Any) -> None:
        with self._lock:
            if request in self._open:
                self._open[request] = True

    def shutdown_request(self, request: Any) -> None:
        with self._lock:
            self._open.pop(request, None)
        super().shutdown_request(request)

    def handle_error(self, request: Any, client_address: Any) -> None:
        self._log("metrics: a connection failed: %s", sys.exc_info()[1])

    def _log(self, message: str, *args: Any) -> None:
        now = time.monotonic()
        if now - self._logged >= LOG_EVERY_S:
            self._logged = now
            log.warning(message, *args)


class MetricsServer:
    """Serves /metrics over HTTP on its own threads."""

    def __init__(self, host: str, port: int, snapshot: Callable[[], Snapshot]) -> None:
        class Handler(BaseHTTPRequestHandler):
            timeout = METRICS_TIMEOUT_S

            def parse_request(self) -> bool:
                server.answering(self.request)
                return super().parse_request()

            def do_GET(self) -> None:
                if self.path.split("?")[0] not in ("/metrics", "/"):
                    self.send_error(404, "only /metrics is served")
                    return
                body = render(snapshot()).encode()
                self.send_response(200)
                self.send_header("Content-Type", CONTENT_TYPE_LATEST)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args) -> None:
                pass

        self._server = server = _HttpServer((host, port), Handler)
        self._closing = threading.Event()
        self._thread = threading.Thread(target=threads.supervised("gpuwatch-metrics", self._server.serve_forever,
                                                                  self._closing),
                                        name="gpuwatch-metrics", daemon=True)
        self._thread.start()

    @property
    def port(self) -> int:
        return self._server.server_address[1]

    def close(self) -> None:
        self._closing.set()
        self._server.shutdown()
        self._server.server_close()
