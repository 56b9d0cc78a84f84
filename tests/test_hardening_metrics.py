"""Issue 12, finding 11: the scheduler's wait-time histogram is a valid Prometheus histogram.

Its buckets were made cumulative twice (once as each wait was counted, again in the summary): after one 4.48 s
wait `/metrics` showed le="300.0" 5 but le="+Inf" 1. The waits here go through the Enforcer's own accounting,
the snapshot through `render()`, and the result is compared with what prometheus-client itself renders for
the same waits observed by its own Histogram, and checked by promtool. No eBPF, no daemon."""
from __future__ import annotations

import subprocess
from collections.abc import Iterable

import pytest
from prometheus_client import CollectorRegistry, Histogram, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from gpuwatch.core.view import Gpu, ProcessGpu, Snapshot, TracerHealth
from gpuwatch.enforcer.enforcer import Enforcer
from gpuwatch.enforcer.scheduler import Decision, Verdict
from gpuwatch.enforcer.settings import WAIT_BUCKETS, SchedulerSettings, account
from gpuwatch.exporters.metrics import families, render

HISTOGRAM = "gpuwatch_scheduler_wait_seconds"
WAITS = (4.48, 0.02, 100.0, 0.02, 7.0, 1000.0)   # seconds; one past every bound, two equal, one on no bound


def enforcer_after(waits: Iterable[float]) -> Enforcer:
    """An Enforcer whose accounting saw each wait: a process stopped, then run again that much later."""
    enforcer = Enforcer(lambda: None, None, None, SchedulerSettings())  # type: ignore[arg-type]
    now = 1000.0
    for i, wait in enumerate(waits):
        pid = 100 + i
        for verdict, at in ((Verdict.RUN, now), (Verdict.STOP, now), (Verdict.RUN, now + wait)):
            account(enforcer.stats, enforcer._waits, {pid: Decision(verdict)}, False, 0.05, at)
        now += wait
    enforcer.close()
    return enforcer


def snapshot(enforcer: Enforcer) -> Snapshot:
    row = ProcessGpu(pid=7, comm="train", gpu=0, gpu_uuid="GPU-1", device_bytes=1 << 20)
    return Snapshot([row], [Gpu(0, "GPU-1", "H200", 10, 4, 30)], TracerHealth("off"), enforcer.summary())


def samples(text: str, family: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """(sample name, labels) -> value of one family in an exposition; _created samples left out."""
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for f in text_string_to_metric_families(text) if f.name == family
            for s in f.samples if not s.name.endswith("_created")}


def reference(waits: Iterable[float]) -> str:
    """prometheus-client's own histogram of the same waits."""
    registry = CollectorRegistry(auto_describe=False)
    h = Histogram(HISTOGRAM, "How long processes waited for their turn on a sliced GPU", buckets=WAIT_BUCKETS,
                  registry=registry)
    for wait in waits:
        h.observe(wait)
    return generate_latest(registry).decode()


def expected_buckets(waits: Iterable[float]) -> list[int]:
    return [sum(1 for w in waits if w <= bound) for bound in WAIT_BUCKETS]


def test_summary_after_known_waits_counts_each_wait_once_per_bucket_at_or_above_it() -> None:
    summary = enforcer_after(WAITS).summary()
    assert [b for b, _ in summary.wait_buckets] == list(WAIT_BUCKETS)
    assert [n for _, n in summary.wait_buckets] == expected_buckets(WAITS) == [0, 2, 2, 2, 2, 3, 4, 4, 4, 5]
    assert summary.wait_count == len(WAITS)
    assert summary.wait_sum == pytest.approx(sum(WAITS))


def test_one_wait_of_4_48_seconds() -> None:
    summary = enforcer_after([4.48]).summary()
    assert dict(summary.wait_buckets)[300.0] == 1 == summary.wait_count
    assert [n for _, n in summary.wait_buckets] == [0, 0, 0, 0, 0, 1, 1, 1, 1, 1]


@pytest.mark.parametrize("waits", [WAITS, (4.48,), ()], ids=["several", "one", "none"])
def test_histogram_equals_prometheus_clients_own_and_is_valid(waits: tuple[float, ...]) -> None:
    snap = snapshot(enforcer_after(waits))
    text = render(snap)

    class Reference:
        def collect(self):
            return families(snap)

    registry = CollectorRegistry(auto_describe=False)
    registry.register(Reference())
    assert text == generate_latest(registry).decode()

    mine, theirs = samples(text, HISTOGRAM), samples(reference(waits), HISTOGRAM)
    assert mine.keys() == theirs.keys()
    for key, value in theirs.items():
        assert mine[key] == pytest.approx(value), key

    # every histogram in the exposition: non-decreasing buckets, +Inf equal to _count
    histograms = [f for f in text_string_to_metric_families(text) if f.type == "histogram"]
    assert [f.name for f in histograms] == [HISTOGRAM]
    for f in histograms:
        buckets = [(s.labels["le"], s.value) for s in f.samples if s.name == f.name + "_bucket"]
        counts = [n for _, n in buckets]
        assert counts == sorted(counts), buckets
        assert buckets[-1][0] == "+Inf"
        count = next(s.value for s in f.samples if s.name == f.name + "_count")
        assert buckets[-1][1] == count == len(waits)
        assert counts[:-1] == expected_buckets(waits)

    lint = subprocess.run(["promtool", "check", "metrics"], input=text, capture_output=True, text=True)
    assert lint.returncode == 0 and lint.stdout.strip() == "" and lint.stderr.strip() == "", lint.stdout + lint.stderr
