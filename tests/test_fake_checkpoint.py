"""The test-double driver's process checkpoint API (tests/fakecuda): this process loads the driver through ctypes,
as the daemon does (cuInit(0), no context), and locks, checkpoints, restores and unlocks cudaprog targets that share
one emulated GPU through FAKECUDA_SHARED_STATE; the fake NVML lists them from the same file (FAKENVML_CUDA_STATE)."""
from __future__ import annotations

import ctypes as C
import os
import select
import shutil
import signal
import struct
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from conftest import ROOT, Prog, environment, wait_for
from interposer_fixtures import MiB, driver_used

CAPACITY = 64 * MiB
RUNNING, LOCKED, CHECKPOINTED, FAILED = range(4)  # CUprocessState
INVALID_VALUE, OUT_OF_MEMORY, NOT_INITIALIZED = 1, 2, 3
OPERATING_SYSTEM, ILLEGAL_STATE, NOT_SUPPORTED, TIMEOUT = 304, 401, 801, 909
TABLE_OFFSET, SLOT_SIZE = 4096, 1136  # the process table in the shared state file (fakecuda.c)


class LockArgs(C.Structure):
    _fields_ = [("timeoutMs", C.c_uint), ("reserved0", C.c_uint), ("reserved1", C.c_uint64 * 7)]


class Uuid(C.Structure):
    _fields_ = [("bytes", C.c_char * 16)]


class GpuPair(C.Structure):
    _fields_ = [("oldUuid", Uuid), ("newUuid", Uuid)]


class RestoreArgs(C.Structure):
    _fields_ = [("gpuPairs", C.POINTER(GpuPair)), ("gpuPairsCount", C.c_uint), ("reserved", C.c_char * 44),
                ("reserved1", C.c_uint64)]


class ProcessInfo(C.Structure):  # nvmlProcessInfo_v2_t
    _fields_ = [("pid", C.c_uint), ("usedGpuMemory", C.c_ulonglong), ("gpuInstanceId", C.c_uint),
                ("computeInstanceId", C.c_uint)]


assert C.sizeof(LockArgs) == 64 and C.sizeof(RestoreArgs) == 64 and C.sizeof(GpuPair) == 32


def uuid(dev: int) -> Uuid:
    return Uuid(b"fakecuda-dev%04d" % dev)


class Driver:
    """The test double in this process, as the daemon holds it: its own copy of the library (an instance reads
    its environment once, at its first cuInit), configured with `env`."""

    def __init__(self, copy: Path, env: dict[str, str], init: bool = True) -> None:
        self.env = env
        self.cu = C.CDLL(str(copy))
        self.cu.cuGetErrorName.argtypes = [C.c_int, C.POINTER(C.c_char_p)]
        self.cu.cuGetErrorString.argtypes = [C.c_int, C.POINTER(C.c_char_p)]
        if init:
            assert self.init() == 0

    def init(self) -> int:
        with environment(self.env):
            return self.cu.cuInit(0)

    def state(self, pid: int) -> int:
        """The CUprocessState, or -CODE."""
        s = C.c_int(-1)
        rc = self.cu.cuCheckpointProcessGetState(pid, C.byref(s))
        return s.value if rc == 0 else -rc

    def restore_tid(self, pid: int) -> int:
        tid = C.c_int()
        rc = self.cu.cuCheckpointProcessGetRestoreThreadId(pid, C.byref(tid))
        return tid.value if rc == 0 else -rc

    def lock(self, pid: int, timeout_ms: int = 0) -> int:
        return self.cu.cuCheckpointProcessLock(pid, C.byref(LockArgs(timeout_ms)))

    def checkpoint(self, pid: int) -> int:
        return self.cu.cuCheckpointProcessCheckpoint(pid, None)

    def restore(self, pid: int, pairs: list[tuple[int, int]] | None = None) -> int:
        if pairs is None:
            return self.cu.cuCheckpointProcessRestore(pid, None)
        array = (GpuPair * len(pairs))(*(GpuPair(uuid(a), uuid(b)) for a, b in pairs))
        return self.cu.cuCheckpointProcessRestore(pid, C.byref(RestoreArgs(array, len(pairs))))

    def unlock(self, pid: int) -> int:
        return self.cu.cuCheckpointProcessUnlock(pid, None)

    def error(self, code: int) -> tuple[str, str]:
        name, text = C.c_char_p(), C.c_char_p()
        assert self.cu.cuGetErrorName(code, C.byref(name)) == 0
        assert self.cu.cuGetErrorString(code, C.byref(text)) == 0
        return name.value.decode(), text.value.decode()


class Target(Prog):
    """A cudaprog on the shared GPU. post() sends a command without waiting; reply() is the next answer within
    `timeout` seconds, or None."""

    def post(self, line: str) -> None:
        assert self.proc.stdin
        self.proc.stdin.write(line + "\n")
        self.proc.stdin.flush()

    def reply(self, timeout: float) -> str | None:
        assert self.proc.stdout
        if not select.select([self.proc.stdout], [], [], timeout)[0]:
            return None
        return self.proc.stdout.readline().strip()

    def send(self, line: str) -> str:
        self.post(line)
        reply = self.reply(15)
        assert reply, f"no reply to {line!r} (exit code {self.proc.poll()})"
        return reply


class Nvml:
    """The fake NVML, showing two GPUs (FAKENVML_STATE) and the test double's processes (FAKENVML_CUDA_STATE)."""

    def __init__(self, lib: Path) -> None:
        self.nv = C.CDLL(str(lib))
        assert self.nv.nvmlInit_v2() == 0

    def procs(self, gpu: int) -> dict[int, int]:
        handle, count, infos = C.c_void_p(), C.c_uint(16), (ProcessInfo * 16)()
        assert self.nv.nvmlDeviceGetHandleByIndex_v2(gpu, C.byref(handle)) == 0
        assert self.nv.nvmlDeviceGetComputeRunningProcesses_v3(handle, C.byref(count), infos) == 0
        return {infos[i].pid: infos[i].usedGpuMemory for i in range(count.value)}


@pytest.fixture(scope="module")
def fakenvml_lib(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("fakenvml")
    subprocess.run(["make", "-s", "-C", str(ROOT / "tests" / "fakenvml"), f"OUT={out}"], check=True)
    return out / "libnvidia-ml.so.1"


@pytest.fixture
def state(tmp_path: Path) -> Path:
    """The emulated GPUs' shared state file of one test."""
    return tmp_path / "gpu"


def gpu_env(state: Path) -> dict[str, str]:
    return {"FAKECUDA_SHARED_STATE": str(state), "FAKECUDA_MEM_BYTES": str(CAPACITY), "FAKECUDA_DEVICES": "2"}


@pytest.fixture
def caller(fakecuda: Path, tmp_path: Path, state: Path) -> Driver:
    copy = tmp_path / "caller" / "libcuda.so.1"
    copy.parent.mkdir()
    shutil.copy2(fakecuda / "libcuda.so.1", copy)
    return Driver(copy, gpu_env(state))


@pytest.fixture
def targets(fakecuda: Path, state: Path) -> Iterator[Callable[..., Target]]:
    """Starts cudaprog targets on the shared GPU with the driver loaded and device 0's context current."""
    started: list[Target] = []

    def start(**env: str) -> Target:
        t = Target([str(fakecuda / "cudaprog")], {**gpu_env(state), **env})
        started.append(t)
        t.ok(f"load {fakecuda / 'libcuda.so.1'}")
        t.ok("ctx 0")
        return t

    yield start
    for t in started:
        if t.proc.poll() is None:
            os.kill(t.pid, signal.SIGCONT)
        t.close()


@pytest.fixture
def nvml(fakenvml_lib: Path, tmp_path: Path, state: Path, monkeypatch: pytest.MonkeyPatch) -> Nvml:
    gpus = tmp_path / "nvml-state"
    gpus.write_text(f"gpu 0 GPU-00000000-0000-0000-0000-000000000000 {CAPACITY} 0 Fake 0\n"
                    f"gpu 1 GPU-11111111-1111-1111-1111-111111111111 {CAPACITY} 0 Fake 1\n")
    monkeypatch.setenv("FAKENVML_STATE", str(gpus))
    monkeypatch.setenv("FAKENVML_CUDA_STATE", str(state))
    return Nvml(fakenvml_lib)


def peek(pid: int, addr: int, n: int = 4096) -> bytes | None:
    """What the target's memory holds at addr (None: nothing readable there)."""
    try:
        with open(f"/proc/{pid}/mem", "rb", buffering=0) as f:
            f.seek(addr)
            return f.read(n)
    except OSError:
        return None


def protection(pid: int, addr: int) -> str:
    for line in Path(f"/proc/{pid}/maps").read_text().splitlines():
        lo, hi = (int(x, 16) for x in line.split()[0].split("-"))
        if lo <= addr < hi:
            return line.split()[1]
    return "unmapped"


def slot_pids(state: Path) -> list[int]:
    data = state.read_bytes()
    magic, version, nslots, slot_size = struct.unpack_from("<4I", data, TABLE_OFFSET)
    assert (magic, version, slot_size) == (0x4B435046, 1, SLOT_SIZE)
    return [struct.unpack_from("<i", data, TABLE_OFFSET + 64 + i * SLOT_SIZE)[0] for i in range(nslots)]


def test_lock_checkpoint_restore_unlock(targets, caller: Driver, state: Path, nvml: Nvml) -> None:
    t = targets()
    for cmd in ("alloc a 4M", "fill a 1", "create h 2M 0", "reserve r 2M", "map r 0 2M h", "fill r 2"):
        t.ok(cmd)
    a, r = (int(t.ok(f"ptr {name}")[0], 16) for name in ("a", "r"))
    held = 6 * MiB
    before = peek(t.pid, a), peek(t.pid, r)
    assert driver_used(state) == held and nvml.procs(0) == {t.pid: held}
    assert caller.state(t.pid) == RUNNING

    assert caller.lock(t.pid, 1000) == 0
    assert caller.state(t.pid) == LOCKED
    assert t.ok("pid") == [str(t.pid)] and t.ok("uuid 0") == []  # CPU work and queries go on
    t.post("info")  # a gated call: it waits until the unlock
    assert t.reply(0.3) is None

    assert caller.checkpoint(t.pid) == 0
    assert caller.state(t.pid) == CHECKPOINTED
    assert driver_used(state) == 0  # exactly the bytes the process held
    assert nvml.procs(0) == {t.pid: 0}  # listed with 0 bytes, as NVML lists a checkpointed process
    assert protection(t.pid, a) == "---p" and protection(t.pid, r) == "---p"
    assert peek(t.pid, a) != before[0] and peek(t.pid, r) != before[1]  # the device ranges hold nothing

    assert caller.restore(t.pid) == 0
    assert caller.state(t.pid) == LOCKED
    assert driver_used(state) == held and nvml.procs(0) == {t.pid: held}
    assert protection(t.pid, a) == "rw-p" and protection(t.pid, r) == "rw-s"  # VMM: a shared memfd mapping
    assert (peek(t.pid, a), peek(t.pid, r)) == before  # same bytes at the same addresses
    assert t.reply(0.2) is None

    assert caller.unlock(t.pid) == 0
    assert caller.state(t.pid) == RUNNING
    assert t.reply(5) == f"ok {CAPACITY - held} {CAPACITY}"  # the waiting call went on
    assert t.ok("check a 1") == ["1"] and t.ok("check r 2") == ["1"]
    assert [int(t.ok(f"ptr {name}")[0], 16) for name in ("a", "r")] == [a, r]
    t.ok("free a")
    assert driver_used(state) == 2 * MiB

    # twice more: nothing is left over from the first cycle
    for _ in range(2):
        assert [caller.lock(t.pid), caller.checkpoint(t.pid)] == [0, 0] and driver_used(state) == 0
        assert [caller.restore(t.pid), caller.unlock(t.pid)] == [0, 0] and driver_used(state) == 2 * MiB
    assert t.ok("check r 2") == ["1"]


def test_agent_thread(targets, caller: Driver) -> None:
    t = targets()
    tid = caller.restore_tid(t.pid)
    assert Path(f"/proc/{t.pid}/task/{tid}/comm").read_text().strip() == "cuda-ckpt"

    def cpu_ticks() -> int:
        fields = Path(f"/proc/{t.pid}/task/{tid}/stat").read_text().rsplit(")", 1)[1].split()
        return int(fields[11]) + int(fields[12])  # utime, stime

    before = cpu_ticks()
    time.sleep(1)
    assert cpu_ticks() - before <= 1  # an idle target's agent sleeps


def test_lock_waits_for_calls_in_flight(targets, caller: Driver) -> None:
    t = targets()
    t.post("busy 1500")
    time.sleep(0.2)
    start = time.monotonic()
    assert caller.lock(t.pid, 200) == TIMEOUT
    assert 0.15 < time.monotonic() - start < 1.0
    assert caller.state(t.pid) == RUNNING
    assert t.reply(5) == "ok"
    assert t.ok("info") == [str(CAPACITY), str(CAPACITY)]  # not locked: calls go on

    t.post("busy 600")
    time.sleep(0.1)
    start = time.monotonic()
    assert caller.lock(t.pid) == 0  # no timeout: waits until the call ends
    assert time.monotonic() - start > 0.35
    assert t.reply(1) == "ok"
    assert caller.state(t.pid) == LOCKED
    assert caller.unlock(t.pid) == 0


def test_threads_in_gated_calls(targets, caller: Driver, state: Path) -> None:
    """Threads submitting work without a pause stop at the gate and go on after the unlock, every byte kept."""
    t = targets()
    t.ok("alloc a 1M")
    t.ok("fill a 1")  # the pattern the "verify" work checks
    t.ok("alloc b 1M")
    t.ok("spin s1 memset b")
    t.ok("spin s2 verify a")
    time.sleep(0.1)
    answers: list[int] = []
    lockers = [threading.Thread(target=lambda: answers.append(caller.lock(t.pid, 2000))) for _ in range(2)]
    for thread in lockers:
        thread.start()
    for thread in lockers:
        thread.join(5)
    assert sorted(answers) == [0, ILLEGAL_STATE]  # two callers at once: one locks, one finds it LOCKED
    counts = [int(t.ok(f"spinstat {s}")[0]) for s in ("s1", "s2")]
    time.sleep(0.2)
    assert [int(t.ok(f"spinstat {s}")[0]) for s in ("s1", "s2")] == counts
    assert [caller.checkpoint(t.pid), caller.restore(t.pid), caller.unlock(t.pid)] == [0, 0, 0]
    time.sleep(0.2)
    assert all(int(t.ok(f"spinstat {s}")[0]) > n for s, n in zip(("s1", "s2"), counts))
    assert t.ok("spinstop s1")[1:] == ["0", "0"] and t.ok("spinstop s2")[1:] == ["0", "0"]  # no errors
    assert t.ok("check a 1") == ["1"] and driver_used(state) == 2 * MiB


def test_refusals(targets, caller: Driver, state: Path) -> None:
    t = targets(FAKECUDA_CHECKPOINT_REFUSE=str(NOT_SUPPORTED))
    assert caller.lock(t.pid, 100) == NOT_SUPPORTED
    assert caller.state(t.pid) == RUNNING

    for setup in (["managed m 1M"], ["alloc a 1M", "ipc a"]):
        t = targets()
        for cmd in setup:
            t.ok(cmd)
        used = driver_used(state)
        assert caller.lock(t.pid) == 0  # the driver locks it, and refuses the checkpoint
        assert caller.checkpoint(t.pid) == NOT_SUPPORTED
        assert caller.state(t.pid) == LOCKED and driver_used(state) == used
        assert caller.unlock(t.pid) == 0
        t.ok("info")


def test_illegal_states(targets, caller: Driver) -> None:
    t = targets()
    t.ok("alloc a 1M")
    assert [caller.checkpoint(t.pid), caller.restore(t.pid), caller.unlock(t.pid)] == [ILLEGAL_STATE] * 3
    assert caller.lock(t.pid) == 0
    assert [caller.lock(t.pid), caller.restore(t.pid)] == [ILLEGAL_STATE] * 2
    assert caller.checkpoint(t.pid) == 0
    assert [caller.lock(t.pid), caller.checkpoint(t.pid), caller.unlock(t.pid)] == [ILLEGAL_STATE] * 3
    assert caller.state(t.pid) == CHECKPOINTED
    assert [caller.restore(t.pid), caller.unlock(t.pid)] == [0, 0]


def test_arguments(targets, caller: Driver, fakecuda: Path, tmp_path: Path, state: Path) -> None:
    t = targets()
    cu = caller.cu
    assert cu.cuCheckpointProcessGetState(t.pid, None) == INVALID_VALUE
    assert cu.cuCheckpointProcessGetRestoreThreadId(t.pid, None) == INVALID_VALUE
    assert cu.cuCheckpointProcessLock(t.pid, C.byref(LockArgs(0, 1))) == INVALID_VALUE
    bad = LockArgs()
    bad.reserved1[6] = 1
    assert cu.cuCheckpointProcessLock(t.pid, C.byref(bad)) == INVALID_VALUE
    assert cu.cuCheckpointProcessCheckpoint(t.pid, C.byref((C.c_uint64 * 8)(0, 0, 1))) == INVALID_VALUE
    assert cu.cuCheckpointProcessUnlock(t.pid, C.byref((C.c_uint64 * 8)(1))) == INVALID_VALUE
    assert cu.cuCheckpointProcessRestore(t.pid, C.byref(RestoreArgs(None, 1))) == INVALID_VALUE
    assert cu.cuCheckpointProcessLock(t.pid, None) == 0  # no arguments: no timeout
    assert cu.cuCheckpointProcessUnlock(t.pid, None) == 0
    assert caller.state(t.pid) == RUNNING

    copy = tmp_path / "uninitialized" / "libcuda.so.1"
    copy.parent.mkdir()
    shutil.copy2(fakecuda / "libcuda.so.1", copy)
    fresh = Driver(copy, gpu_env(state), init=False)
    assert fresh.state(t.pid) == -NOT_INITIALIZED
    assert fresh.lock(t.pid) == NOT_INITIALIZED

    for code, name in ((OPERATING_SYSTEM, "CUDA_ERROR_OPERATING_SYSTEM"), (ILLEGAL_STATE, "CUDA_ERROR_ILLEGAL_STATE"),
                       (NOT_SUPPORTED, "CUDA_ERROR_NOT_SUPPORTED"), (TIMEOUT, "CUDA_ERROR_TIMEOUT"),
                       (OUT_OF_MEMORY, "CUDA_ERROR_OUT_OF_MEMORY"), (999, "CUDA_ERROR_UNKNOWN")):
        assert caller.error(code)[0] == name and caller.error(code)[1]


def test_no_shared_state(targets, fakecuda: Path, tmp_path: Path) -> None:
    t = targets()
    copy = tmp_path / "alone" / "libcuda.so.1"
    copy.parent.mkdir()
    shutil.copy2(fakecuda / "libcuda.so.1", copy)
    alone = Driver(copy, {"FAKECUDA_SHARED_STATE": ""})
    assert alone.state(t.pid) == -NOT_SUPPORTED  # this driver sees no other process


def test_restore_waits_for_room(targets, caller: Driver, state: Path, nvml: Nvml) -> None:
    a = targets()
    a.ok("alloc x 40M")
    a.ok("fill x 3")
    assert [caller.lock(a.pid), caller.checkpoint(a.pid)] == [0, 0]
    b = targets()
    b.ok("alloc y 30M")
    assert driver_used(state) == 30 * MiB

    assert caller.restore(a.pid) == OUT_OF_MEMORY
    assert caller.state(a.pid) == CHECKPOINTED and driver_used(state) == 30 * MiB
    assert nvml.procs(0) == {a.pid: 0, b.pid: 30 * MiB}

    b.ok("free y")
    assert caller.restore(a.pid) == 0
    assert driver_used(state) == 40 * MiB and nvml.procs(0) == {a.pid: 40 * MiB}
    assert caller.unlock(a.pid) == 0
    assert a.ok("check x 3") == ["1"]


def test_restore_without_room_can_fail_for_good(targets, caller: Driver, state: Path) -> None:
    a = targets(FAKECUDA_RESTORE_STUCK="1")
    a.ok("alloc x 40M")
    assert [caller.lock(a.pid), caller.checkpoint(a.pid)] == [0, 0]
    b = targets()
    b.ok("alloc y 30M")
    assert caller.restore(a.pid) == OUT_OF_MEMORY
    assert caller.state(a.pid) == FAILED
    b.ok("free y")
    assert caller.restore(a.pid) == OPERATING_SYSTEM  # room or not, as NVIDIA/cuda-checkpoint issue 44 reports
    assert [caller.unlock(a.pid), caller.lock(a.pid), caller.checkpoint(a.pid)] == [ILLEGAL_STATE] * 3
    assert caller.state(a.pid) == FAILED and driver_used(state) == 0


def test_processes_without_the_driver_and_dead_targets(targets, caller: Driver) -> None:
    sleeper = subprocess.Popen(["sleep", "30"])
    gone = subprocess.Popen(["true"])
    gone.wait()
    try:
        for pid in (sleeper.pid, gone.pid, 0, -1):
            assert caller.state(pid) == -INVALID_VALUE and caller.lock(pid) == INVALID_VALUE
    finally:
        sleeper.kill()
        sleeper.wait()

    # killed while locked (a zombie until reaped): answers at once
    t = targets()
    assert caller.lock(t.pid) == 0
    t.proc.kill()
    wait_for(lambda: caller.state(t.pid) == -INVALID_VALUE, 1, "the killed target to be gone")
    start = time.monotonic()
    assert caller.unlock(t.pid) == INVALID_VALUE
    assert time.monotonic() - start < 0.1
    t.proc.wait()

    # a stopped target is waited for: up to the lock's timeout, or until it dies
    t = targets()
    os.kill(t.pid, signal.SIGSTOP)
    start = time.monotonic()
    assert caller.lock(t.pid, 300) == TIMEOUT
    assert time.monotonic() - start < 1.0
    answer: list[int] = []
    waiter = threading.Thread(target=lambda: answer.append(caller.lock(t.pid)))
    waiter.start()
    time.sleep(0.3)
    assert waiter.is_alive()
    t.proc.kill()
    waiter.join(2)
    assert answer == [INVALID_VALUE]

    # one stopped and continued: the request it never took did not run
    t = targets()
    os.kill(t.pid, signal.SIGSTOP)
    assert caller.lock(t.pid, 200) == TIMEOUT
    os.kill(t.pid, signal.SIGCONT)
    time.sleep(0.1)
    assert caller.state(t.pid) == RUNNING
    t.ok("info")
    assert [caller.lock(t.pid, 1000), caller.unlock(t.pid)] == [0, 0]


def test_gpu_pairs_move_memory_to_another_device(targets, caller: Driver, state: Path, nvml: Nvml) -> None:
    t = targets()
    t.ok("alloc a 8M")
    t.ok("fill a 4")
    assert [caller.lock(t.pid), caller.checkpoint(t.pid)] == [0, 0]
    for pairs in ([(1, 0)], [(0, 2)], [(0, 1), (0, 0)], [(0, 1), (1, 1)]):  # missing device 0, no device 2, twice
        assert caller.restore(t.pid, pairs) == INVALID_VALUE
    assert caller.state(t.pid) == CHECKPOINTED

    assert caller.restore(t.pid, [(0, 1), (1, 0)]) == 0
    assert (driver_used(state, 0), driver_used(state, 1)) == (0, 8 * MiB)
    assert nvml.procs(0) == {} and nvml.procs(1) == {t.pid: 8 * MiB}
    assert caller.unlock(t.pid) == 0
    assert t.ok("check a 4") == ["1"]
    assert t.ok("info") == [str(CAPACITY - 8 * MiB), str(CAPACITY)]  # device 0's memory is device 1's now
    t.ok("alloc b 1M")
    assert (driver_used(state, 0), driver_used(state, 1)) == (0, 9 * MiB)
    t.ok("free a")
    t.ok("free b")
    assert (driver_used(state, 0), driver_used(state, 1)) == (0, 0)


def test_slots_and_nvml(targets, caller: Driver, state: Path, nvml: Nvml, monkeypatch: pytest.MonkeyPatch) -> None:
    first = targets()
    first.ok("alloc a 1M")
    index = slot_pids(state).index(first.pid)
    assert nvml.procs(0) == {first.pid: MiB}
    first.close()
    assert nvml.procs(0) == {}  # an ended process is not listed, though its slot still names it
    assert slot_pids(state)[index] == first.pid
    second = targets()
    assert slot_pids(state)[index] == second.pid  # the first free slot: the ended process's
    second.ok("alloc b 2M")
    assert nvml.procs(0) == {second.pid: 2 * MiB}
    monkeypatch.delenv("FAKENVML_CUDA_STATE")
    assert nvml.procs(0) == {}  # without it, only the state file's proc lines
