"""A test-double GPU of CAPACITY bytes that the real daemon schedules: a fake NVML showing it, daemons with a
scheduler configuration of the test's own, and programs started on it (plain or under the interposer)."""
from __future__ import annotations

import os
import queue
import subprocess
import tempfile
import threading
from pathlib import Path

import pytest

from conftest import ROOT, Daemon, environment, wait_for
from interposer_fixtures import IProg, MiB

CAPACITY = 96 * MiB


@pytest.fixture(scope="module")
def gpu(tmp_path_factory) -> tuple[Path, Path]:
    """A fake NVML that shows one GPU of CAPACITY bytes, and the shared state of the test-double driver."""
    out = tmp_path_factory.mktemp("fakenvml")
    subprocess.run(["make", "-s", "-C", str(ROOT / "tests" / "fakenvml"), f"OUT={out}"], check=True)
    (out / "state").write_text(f"gpu 0 GPU-11111111-2222-3333-4444-555555555555 {CAPACITY} 0 Fake GPU\n")
    return out, out / "state"


def scheduling_daemon(gpu: tuple[Path, Path], prefix: str, scheduler: str) -> Daemon:
    """A daemon with NVML (the fake one) and this [scheduler] section, launches probed exactly."""
    workdir = Path(tempfile.mkdtemp(prefix=prefix))
    workdir.chmod(0o755)
    config = workdir / "gpuwatch.toml"
    config.write_text(f"[scheduler]\n{scheduler}")
    lib_dir, state = gpu
    os.environ["LD_LIBRARY_PATH"], os.environ["FAKENVML_STATE"] = str(lib_dir), str(state)
    try:
        return Daemon(workdir, "--config", str(config), "--launches", "all", nvml=True)
    finally:
        del os.environ["LD_LIBRARY_PATH"], os.environ["FAKENVML_STATE"]


def driver_daemon(gpu: tuple[Path, Path], shared: Path, driver_env: dict[str, str], config_text: str,
                  workdir: Path | None = None) -> Daemon:
    """A daemon with the fake NVML of `gpu` (listing the test double's processes on `shared`, 0 bytes while
    checkpointed) and this configuration; `driver_env`: the test-double driver's, whose checkpoint API the daemon
    calls where the configuration names it ([daemon] driver)."""
    workdir = workdir or Path(tempfile.mkdtemp(prefix="gpuwatch-driver-"))
    workdir.chmod(0o755)
    config = workdir / "gpuwatch.toml"
    config.write_text(config_text)
    lib_dir, state = gpu
    with environment({"LD_LIBRARY_PATH": str(lib_dir), "FAKENVML_STATE": str(state),
                      "FAKENVML_CUDA_STATE": str(shared), **driver_env}):
        return Daemon(workdir, "--config", str(config), "--launches", "all", nvml=True)


def gpu_env(fakecuda: Path, shared: Path) -> dict[str, str]:
    """The test-double driver of a program on the shared GPU (`shared`: its state file)."""
    return {"GPUWATCH_REAL_LIBCUDA": str(fakecuda / "libcuda.so.1"), "FAKECUDA_SHARED_STATE": str(shared),
            "FAKECUDA_MEM_BYTES": str(CAPACITY), "FAKECUDA_DEVICES": "1"}


def start_interposed(fakecuda: Path, interposer: Path, daemon: Daemon, shared: Path) -> IProg:
    """A program under the interposer on the shared GPU, once the daemon sees it attached."""
    p = IProg([str(fakecuda / "cudaprog")], {**gpu_env(fakecuda, shared), "LD_PRELOAD": str(interposer),
                                             "GPUWATCH_SOCKET": daemon.socket})
    p.timeout = 30
    p.ok(f"load {fakecuda / 'libcuda.so.1'}")
    # the probes too: what the process allocates before they attach, they do not see
    wait_for(lambda: daemon.watching(fakecuda / "libcuda.so.1"), 10, "the daemon to watch the driver")
    p.ok("ctx 0")
    wait_for(lambda: p.pid in {r["pid"] for r in daemon.ps() if r["interposed"]}, 10, "the daemon to see the process")
    return p


class PlainProg(IProg):
    """A program without the interposer on test-double GPUs (`env`: the test double's settings), once the daemon
    watches its driver, device `ctx` current; `later` sends a line whose answer may wait (its CUDA calls are
    locked) and returns a queue that gets the reply."""

    def __init__(self, fakecuda: Path, daemon: Daemon, env: dict[str, str], ctx: int = 0) -> None:
        super().__init__([str(fakecuda / "cudaprog")], env)
        self.timeout = 30
        self.ok(f"load {fakecuda / 'libcuda.so.1'}")
        wait_for(lambda: daemon.watching(fakecuda / "libcuda.so.1"), 5, "the daemon to watch the test double")
        self.ok(f"ctx {ctx}")

    def later(self, line: str) -> queue.Queue:
        answers: queue.Queue = queue.Queue()
        threading.Thread(target=lambda: answers.put(self.send(line)), daemon=True).start()
        return answers

    def holding(self, name: str, nbytes: int, seed: int) -> None:
        self.ok(f"alloc {name} {nbytes}")
        self.ok(f"fill {name} {seed}")
