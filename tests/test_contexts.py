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


def test_before_its_context_is_learnt_a_process_is_expected_to_have_the_default() -> None:
    reading = [facts([ProbeRow(pid=10, ordinal=0, device_bytes=4000 * MiB)], {(10, 0): 4610 * MiB})]
    contexts = learner(reading)
    contexts.learn_once()
    assert contexts.expected(10) == 610 * MiB  # learnt: NVML's less what the probes saw
    assert contexts.expected(11) == 768 * MiB  # attached a moment ago: not in this round yet


def test_without_nvml_no_context_is_taken_off() -> None:
    contexts = learner([facts([ProbeRow(pid=10, ordinal=0, device_bytes=4000 * MiB)], None)])
    assert contexts.expected(10) == 0  # no round yet
    contexts.learn_once()
    assert contexts.expected(10) == 0 and contexts.expected(11) == 0
