"""The per-GPU scheduler on a simulated clock: fairness, priority, early release, and where gating starts."""
from __future__ import annotations

from dataclasses import replace

from gpuwatch.enforcer.scheduler import (Client, Decision, Priority, Scheduler, SwitchCost, Verdict, strictest,
                                         default_quantum)

GiB = 1 << 30


class Sim:
    """Processes that launch steadily while they run; the clock advances in ticks."""

    def __init__(self, scheduler: Scheduler, clients: list[Client], tick: float = 0.1) -> None:
        self.s, self.tick, self.now = scheduler, tick, 0.0
        self.clients = {c.pid: c for c in clients}
        self.running: set[int] = set()
        self.run_time = dict.fromkeys(self.clients, 0.0)
        self.idle_from: dict[int, float] = {}   # pid -> from when it stops launching while it runs
        self.switches = 0

    def step(self) -> dict[int, Decision]:
        for pid in self.running:
            c = self.clients[pid]
            active = self.now < self.idle_from.get(pid, float("inf"))
            self.clients[pid] = replace(c, launches=c.launches + (10 if active else 0))
            self.run_time[pid] += self.tick if active else 0.0
        for pid, c in self.clients.items():  # a gated process waits at the gate while it has work
            self.clients[pid] = replace(c, waiting=pid not in self.running and self.now < self.idle_from.get(pid, 1e9))
        decisions = self.s.decide(list(self.clients.values()), self.now)
        running = {pid for pid, d in decisions.items() if d.verdict is Verdict.RUN}
        self.switches += len(running ^ self.running) > 0 and bool(self.running)
        self.running = running
        self.now = round(self.now + self.tick, 6)
        return decisions

    def run(self, seconds: float) -> None:
        for _ in range(round(seconds / self.tick)):
            self.step()


def test_everything_fits_no_gating() -> None:
    sim = Sim(Scheduler(capacity=100 * GiB, quantum=5), [Client(1, 50 * GiB, 50 * GiB), Client(2, 50 * GiB, 50 * GiB)])
    for _ in range(100):
        decisions = sim.step()
        assert {d.verdict for d in decisions.values()} == {Verdict.RUN}
    assert not sim.s.contended


def test_one_byte_over_capacity_starts_slicing_and_swaps_only_the_excess() -> None:
    s = Scheduler(capacity=100 * GiB, quantum=5)
    decisions = s.decide([Client(1, 50 * GiB, 50 * GiB), Client(2, 50 * GiB + 1, 50 * GiB + 1)], 0.0)
    assert s.contended
    verdicts = sorted((d.verdict, d.swap_bytes) for d in decisions.values())
    assert verdicts == [(Verdict.RUN, 0), (Verdict.SWAP, 1)]


def test_gating_stops_when_a_process_leaves() -> None:
    s = Scheduler(capacity=100 * GiB, quantum=5)
    a, b, c = Client(1, 40 * GiB, 40 * GiB), Client(2, 40 * GiB, 40 * GiB), Client(3, 40 * GiB, 40 * GiB)
    assert Verdict.SWAP in {d.verdict for d in s.decide([a, b, c], 0.0).values()}
    assert {d.verdict for d in s.decide([a, b], 0.1).values()} == {Verdict.RUN}
    assert not s.contended


def test_equal_processes_share_the_gpu_fairly_by_quantum() -> None:
    sim = Sim(Scheduler(capacity=100 * GiB, quantum=2.0),
              [Client(1, 60 * GiB, 60 * GiB), Client(2, 60 * GiB, 60 * GiB)])
    sim.run(60)
    assert abs(sim.run_time[1] - sim.run_time[2]) <= 2.0 + 1e-9
    assert 25 <= sim.switches <= 31  # one switch per quantum, not more


def test_three_way_round_robin_least_recently_run_first() -> None:
    clients = [Client(pid, 60 * GiB, 60 * GiB) for pid in (1, 2, 3)]
    sim = Sim(Scheduler(capacity=100 * GiB, quantum=1.0), clients)
    order = []
    for _ in range(60):
        running = [pid for pid, d in sim.step().items() if d.verdict is Verdict.RUN]
        assert len(running) == 1
        if not order or order[-1] != running[0]:
            order.append(running[0])
    assert order[:6] == [order[0], order[1], order[2]] * 2 and len(set(order[:3])) == 3


def test_idle_holder_gives_up_the_rest_of_its_slice() -> None:
    sim = Sim(Scheduler(capacity=100 * GiB, quantum=30, idle=0.5),
              [Client(1, 60 * GiB, 60 * GiB), Client(2, 60 * GiB, 60 * GiB)])
    first = next(pid for pid, d in sim.step().items() if d.verdict is Verdict.RUN)
    sim.idle_from[first] = 2.0  # stops launching at t=2 s, 28 s before its quantum ends
    sim.run(3.0)
    assert sim.running == {3 - first}
    assert 2.5 <= sim.now <= 3.2


def test_high_priority_preempts_at_once_and_low_runs_when_high_is_idle() -> None:
    low = Client(1, 60 * GiB, 60 * GiB, priority=Priority.LOW)
    high = Client(2, 60 * GiB, 60 * GiB, priority=Priority.HIGH, waiting=False)
    sim = Sim(Scheduler(capacity=100 * GiB, quantum=30, idle=0.5), [low, high])
    sim.idle_from[2] = 0.0  # high has nothing to do yet
    sim.run(1.0)
    assert sim.running == {1}
    sim.idle_from[2] = 5.0   # a request arrives: high waits at its gate ...
    sim.step()
    assert sim.running == {2}  # ... and gets the GPU at the next decision, mid-slice of low
    sim.run(4.0)
    assert sim.running == {2}
    sim.run(1.0)  # high idle since t=5 s: low runs again
    assert sim.running == {1}


def test_busy_high_priority_pauses_lower_ones_even_when_memory_fits() -> None:
    s = Scheduler(capacity=100 * GiB, idle=0.5)
    low, high = (Client(1, 10 * GiB, 10 * GiB, priority=Priority.LOW),
                 Client(2, 10 * GiB, 10 * GiB, priority=Priority.HIGH))
    s.decide([low, high], 0.0)
    decisions = s.decide([low, replace(high, launches=5)], 0.1)
    assert decisions[1] == Decision(Verdict.PAUSE) and decisions[2].verdict is Verdict.RUN
    decisions = s.decide([low, replace(high, launches=5)], 1.0)  # high idle for 0.9 s
    assert decisions[1].verdict is Verdict.RUN


def test_process_without_interposer_is_stopped_and_its_memory_counts_as_resident() -> None:
    s = Scheduler(capacity=100 * GiB, quantum=5)
    plain = Client(1, 30 * GiB, 0, interposed=False)
    a, b = Client(2, 60 * GiB, 60 * GiB), Client(3, 60 * GiB, 60 * GiB)
    decisions = s.decide([plain, a, b], 0.0)
    running = {pid for pid, d in decisions.items() if d.verdict is Verdict.RUN}
    assert 1 in running  # it ranks like the others; the interposed ones make room around it
    swapped = sum(d.swap_bytes for d in decisions.values())
    assert swapped == 30 * GiB + 60 * GiB + 60 * GiB - 100 * GiB


def test_exclusive_rule_runs_alone() -> None:
    s = Scheduler(capacity=100 * GiB, quantum=5)
    decisions = s.decide([Client(1, 1 * GiB, 1 * GiB, exclusive=True), Client(2, 1 * GiB, 1 * GiB)], 0.0)
    assert sorted(d.verdict.value for d in decisions.values()) == ["pause", "run"]


def test_default_quantum_keeps_switching_overhead_bounded() -> None:
    assert default_quantum(2.0) == 40.0      # 2 s per switch, 5 % overhead
    assert default_quantum(0.001) == 1.0     # gating without swapping: the floor


def test_while_sliced_a_holder_keeps_its_slice_through_a_pause_shorter_than_a_switch() -> None:
    """A training's CPU-bound moment (data loading, a checkpoint) is no reason to swap it out when swapping
    costs more than the moment."""
    s = Scheduler(capacity=100 * GiB, quantum=30, idle=0.3, switch_cost=2.0)
    sim = Sim(s, [Client(1, 60 * GiB, 60 * GiB), Client(2, 60 * GiB, 60 * GiB)])
    first = next(pid for pid, d in sim.step().items() if d.verdict is Verdict.RUN)
    sim.idle_from[first] = 1.0
    sim.run(1.5)  # idle for 0.6 s: more than idle, less than a switch
    assert sim.running == {first}
    sim.idle_from[first] = 0.0
    sim.run(2.5)  # idle for longer than a switch: it gives the GPU up
    assert sim.running == {3 - first}


def test_switch_cost_learns_a_rate_from_large_moves_only() -> None:
    cost = SwitchCost(bytes_per_s=20e9, latency=0.05)
    assert cost.switch_seconds(0) == 0.0
    assert cost.switch_seconds(10 * 10**9) == 0.05 + 1.0        # 10 GB out and back in at 20 GB/s
    cost.observe(1 << 30, 0.001)                                 # a 1 GiB top-up: fixed cost, not a rate
    assert not cost.measured and cost.bytes_per_s == 20e9
    cost.observe(40 * 10**9, 1.0)
    assert cost.measured and cost.bytes_per_s == 40e9
    cost.observe(40 * 10**9, 0.5)                                # later samples are averaged in
    assert cost.bytes_per_s == 60e9
    assert default_quantum(cost.switch_seconds(30 * 10**9)) == (0.05 + 1.0) / 0.05


def test_slack_moves_a_little_more_than_the_running_set_needs() -> None:
    s = Scheduler(capacity=100 * GiB, quantum=30, slack=2 * GiB)
    decisions = s.decide([Client(1, 60 * GiB, 60 * GiB), Client(2, 60 * GiB, 60 * GiB)], 0.0)
    assert sorted(d.swap_bytes for d in decisions.values()) == [0, 22 * GiB]
    fits = s.decide([Client(1, 40 * GiB, 40 * GiB), Client(2, 60 * GiB, 60 * GiB)], 1.0)
    assert all(d == Decision(Verdict.RUN) for d in fits.values())  # no slack where nothing moves


def test_a_slice_starts_when_the_moves_that_made_room_for_it_end() -> None:
    """A checkpoint of a plain process takes tens of seconds inside the decision that ran the other: that
    time is no part of the other's slice, or it would be sent back at once (the H200's mixed run did that)."""
    s = Scheduler(capacity=100 * GiB, quantum=10.0)
    plain = Client(1, 60 * GiB, movable_bytes=60 * GiB, interposed=False, launches=1)
    newcomer = Client(2, 90 * GiB, movable_bytes=90 * GiB, launches=1)
    assert s.decide([plain], 0.0)[1].verdict is Verdict.RUN
    d = s.decide([replace(plain, launches=2), newcomer], 11.0)  # the plain one's quantum is over
    assert d[2].verdict is Verdict.RUN and d[1].verdict is Verdict.SWAP
    s.started(41.0)  # its checkpoint took 30 s
    d = s.decide([replace(plain, launches=2), replace(newcomer, launches=5)], 41.05)
    assert d[2].verdict is Verdict.RUN and d[1].verdict is Verdict.SWAP  # its slice runs from 41 s
    d = s.decide([replace(plain, launches=2), replace(newcomer, launches=9)], 51.1)
    assert d[1].verdict is Verdict.RUN  # and ends 10 s later


def test_strictest_a_checkpoint_of_a_whole_process_wins_over_a_stop_a_swap_of_an_interposed_one_does_not() -> None:
    swap, stop, run = Decision(Verdict.SWAP, 8 * GiB, "slice of pid 2"), Decision(Verdict.STOP, reason="x"), \
        Decision(Verdict.RUN)
    assert strictest([run, swap, stop], whole=True) == Decision(Verdict.SWAP, 8 * GiB)
    assert strictest([stop, run], whole=True) == Decision(Verdict.STOP)
    assert strictest([run, run], whole=True) == Decision(Verdict.RUN)
    assert strictest([run, swap, stop]) == Decision(Verdict.STOP, 8 * GiB)  # interposed: the stop holds
    assert strictest([Decision(Verdict.PAUSE), Decision(Verdict.SWAP, GiB), Decision(Verdict.SWAP, 3 * GiB)]) == \
        Decision(Verdict.SWAP, 3 * GiB)
