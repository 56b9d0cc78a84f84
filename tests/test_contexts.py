"""What an interposer takes off its quota for the process's CUDA context, before and after it is learnt.

On the H200 a container's process attached, got its 4 GiB quota as its limit and allocated all of it within the
second before its context (610 MiB) was learnt: NVML showed 4.6 GiB for a 4 GiB quota (docs/validation.md)."""
from __future__ import annotations

from gpuwatch.core.view import Gpu, TracerHealth
from gpuwatch.enforcer.contexts import ContextLearner
from gpuwatch.probes.model import ProbeFacts, ProbeRow

MiB = 1 << 20


def facts(rows: list[ProbeRow], nvml: dict[tuple[int, int], int] | None) -> ProbeFacts:
    gpus = [Gpu(0, memory_total=1 << 40)] if nvml is not None else []
    return ProbeFacts(rows, {}, False, False, TracerHealth("off"), gpus, nvml or {})


def learner(reading: list[ProbeFacts]) -> ContextLearner:
    return ContextLearner(lambda: reading[0], lambda pid, ordinal, gpus, uuids: (0, None), lambda: 768 * MiB)


def test_a_context_counts_once_learnt_while_the_allocations_stood_still_and_the_default_before() -> None:
    reading = [facts([ProbeRow(pid=10, ordinal=0, device_bytes=2000 * MiB)], {(10, 0): 1500 * MiB})]
    contexts = learner(reading)
    contexts.learn_once()  # allocating: NVML lags the probes, the difference is no context
    assert contexts.expected(10) == 768 * MiB
    reading[0] = facts([ProbeRow(pid=10, ordinal=0, device_bytes=4000 * MiB)], {(10, 0): 4400 * MiB})
    contexts.learn_once()  # still allocating
    assert contexts.expected(10) == 768 * MiB
    reading[0] = facts([ProbeRow(pid=10, ordinal=0, device_bytes=4000 * MiB)], {(10, 0): 4610 * MiB})
    contexts.learn_once()  # what the probes saw stood still: NVML's less that is the context
    assert contexts.expected(10) == 610 * MiB
    assert contexts.expected(11) == 768 * MiB  # attached a moment ago: not seen yet
    reading[0] = facts([ProbeRow(pid=10, ordinal=0, device_bytes=4200 * MiB)], {(10, 0): 4610 * MiB})
    contexts.learn_once()  # allocating again: the settled figure stays
    assert contexts.expected(10) == 610 * MiB
    reading[0] = facts([], {})
    contexts.learn_once()  # it exited
    assert contexts.expected(10) == 768 * MiB


def test_without_nvml_no_context_is_taken_off() -> None:
    contexts = learner([facts([ProbeRow(pid=10, ordinal=0, device_bytes=4000 * MiB)], None)])
    assert contexts.expected(10) == 0  # no round yet
    contexts.learn_once()
    assert contexts.expected(10) == 0 and contexts.expected(11) == 0


def test_a_process_attaching_in_the_first_second_gets_the_default_taken_off() -> None:
    """On the H200 a container's process attached before the learner's first round and got its whole quota."""
    contexts = learner([facts([], {})])
    contexts.start()
    try:
        assert contexts.expected(11) == 768 * MiB
    finally:
        contexts.close()
