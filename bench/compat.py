"""The compatibility table (docs/compatibility.md): what real programs do, plainly, under the daemon, and under
`gpuwatch exec` with its default options (swapped out and back once mid-run where the program has state),
each result compared with the plain run's. On the GPU machine, from the repository root, as root:

    source .bcc/env.sh && source bench/gw-env.sh && python3 bench/compat.py [CASE ...]

Writes $OUT/compat.json and $OUT/compat.md (the table, the commands, the versions). Without bcc the daemon
column says why and the swaps use the interposer's in-process API; a case whose library (torch, transformers,
jax, cupy, triton) is missing is skipped with the reason. Cases: bench/compat_cases.py (Python) and
bench/compat_driver.cu (runtime and driver API, built here with nvcc). About four minutes on an H200."""
from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_paths import private_socket  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
OUT = Path(os.environ.get("OUT", "/tmp/gw-compat"))
WORK = Path("/tmp/gw-compat")
DRIVER = WORK / "compat_driver"
SOCKET = private_socket("gw-compat")
PARALLEL = 3  # runs at a time
GPUWATCH = [sys.executable, "-P", "-m", "gpuwatch.client.cli", "--socket", SOCKET]
PY = [sys.executable, str(ROOT / "bench" / "compat_cases.py")]
ENV = {"CUBLAS_WORKSPACE_CONFIG": ":4096:8", "PYTHONUNBUFFERED": "1", "TORCHINDUCTOR_CACHE_DIR": str(WORK / "inductor"),
       "XLA_PYTHON_CLIENT_MEM_FRACTION": "0.05", "NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1",
       "NVSHMEM_DISABLE_NVLS": "1",
       # XLA picks its GEMM algorithms by timing them: on the H200 one plain run in six, without gpuwatch, ended
       # with a loss 1 ulp off the others (docs/compatibility.md)
       "XLA_FLAGS": "--xla_gpu_autotune_level=0 --xla_gpu_deterministic_ops=true"}


@dataclass
class Case:
    name: str
    what: str
    argv: list[str]
    needs: tuple[str, ...] = ()  # Python modules
    state: bool = True           # swapped out and back mid-run under gpuwatch exec
    exec_args: tuple[str, ...] = ()
    compare: bool = True         # runs compared by value
    timing: bool = False         # it measures time: alone, and not under the daemon's probes
    timeout: float = 90
    env: tuple[tuple[str, str], ...] = ()
    refused: str = ""            # under gpuwatch exec it is refused, as documented: what the user is told


CASES = [
    Case("torch_eager", "PyTorch eager training, 40 SGD steps", [*PY, "torch_eager"], ("torch",)),
    Case("torch_compile", "torch.compile (Inductor, Triton kernels) training", [*PY, "torch_compile"], ("torch",),
         timeout=240),
    Case("cuda_graphs", "torch.cuda.CUDAGraph capture and 20 replays", [*PY, "cuda_graphs"], ("torch",)),
    Case("torch_mp_ipc", "torch.multiprocessing: a CUDA tensor to a spawned child (legacy CUDA IPC)",
         [*PY, "torch_mp_ipc"], ("torch",)),
    Case("dataloader", "DataLoader, 2 workers, pinned memory", [*PY, "dataloader_pinned"], ("torch",)),
    Case("hf_generate", "transformers GPT-2 (random weights) greedy generate", [*PY, "hf_generate"],
         ("torch", "transformers")),
    Case("jax", "JAX jit and grad, 40 steps", [*PY, "jax_jit"], ("jax",)),
    Case("cupy", "CuPy arrays, CUDA arrays 2D/3D and a texture fetch", [*PY, "cupy_arrays"], ("cupy",)),
    Case("triton", "a Triton kernel", [*PY, "triton_kernel"], ("torch", "triton")),
    Case("nccl", "single-process NCCL (torch.distributed) all-reduce and broadcast", [*PY, "nccl_single"],
         ("torch",)),
    Case("c_arrays", "nvcc C: CUDA arrays (runtime and driver), mipmapped array", [str(DRIVER), "arrays"]),
    Case("c_ipc", "nvcc C: legacy IPC of cudaMalloc memory and an IPC event to a second process",
         [str(DRIVER), "ipc"]),
    Case("c_ipc_foreign", "nvcc C: legacy IPC to a second process that runs without gpuwatch exec",
         [str(DRIVER), "ipc"], state=False, env=(("GW_COMPAT_CHILD_PLAIN", "1"),),
         refused="the importer gets a CUDA error; the exporter's stderr names `gpuwatch exec --no-swap`"),
    Case("c_graphs", "nvcc C: graph capture with cudaMallocAsync (memory nodes), trim", [str(DRIVER), "graphs"]),
    Case("c_pools", "nvcc C: cudaMallocAsync and an explicit memory pool", [str(DRIVER), "pools"]),
    Case("c_fork", "nvcc C: fork after CUDA is initialised (the child does host work)", [str(DRIVER), "fork"]),
    Case("cupy_array_quota", "CuPy CUDA arrays of 512 MiB until 4 or refused (exec: --mem-limit 1GiB)",
         [*PY, "cupy_array_quota"], ("cupy",), state=False, exec_args=("--mem-limit", "1GiB"), compare=False),
    Case("ipc_cost", "nvcc C: 16 IPC handles of 64 MiB opened and closed by a second process (timings)",
         [str(DRIVER), "ipccost"], state=False, compare=False, timing=True),
    Case("vmm_cost", "nvcc C: cuMemCreate+map, plain vs exportable (POSIX fd) handles (timings)",
         [str(DRIVER), "createcost"], state=False, compare=False, timing=True),
]


@dataclass
class Run:
    mode: str
    command: str
    rc: int | None = None
    seconds: float = 0.0
    result: dict[str, Any] | None = None
    verdict: str = ""            # pass, differs, fail, skipped
    detail: str = ""             # what the user saw (a failure), or what moved
    gpuwatch_said: list[str] = field(default_factory=list)
    traced_bytes: int = 0        # the daemon's ps: the process's device_bytes at most
    nvml_bytes: int = 0          # NVML's figure for it at most
    swap: str = ""


def gw(*args: str, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run([*GPUWATCH, *args], capture_output=True, text=True, timeout=timeout)


def versions() -> dict[str, str]:
    found = {"python": sys.version.split()[0]}
    if shutil.which("nvidia-smi"):
        smi = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version", "--format=csv,noheader"],
                             capture_output=True, text=True)
        found["gpu"] = smi.stdout.strip() or smi.stderr.strip()
    nvcc = shutil.which("nvcc") or "/usr/local/cuda/bin/nvcc"
    if os.path.exists(nvcc):
        release = subprocess.run([nvcc, "--version"], capture_output=True, text=True).stdout.strip()
        found["nvcc"] = release.splitlines()[-1] if release else "?"
    for module in ("torch", "transformers", "jax", "jaxlib", "cupy", "triton", "numpy"):
        try:
            from importlib.metadata import version
            found[module] = version(module if module != "cupy" else "cupy-cuda13x")
        except Exception:
            found[module] = "present" if importlib.util.find_spec(module) else "missing"
    return found


def build() -> str | None:
    """Builds the interposer and the C cases; the reason when the C cases cannot run."""
    subprocess.run(["make", "-s", "-C", str(ROOT / "interposer")], check=True)
    WORK.mkdir(parents=True, exist_ok=True)
    nvcc = shutil.which("nvcc") or "/usr/local/cuda/bin/nvcc"
    if not os.path.exists(nvcc):
        return "no nvcc"
    source = str(ROOT / "bench" / "compat_driver.cu")
    for extra in ([], ["-L/usr/local/cuda/lib64/stubs"]):
        r = subprocess.run([nvcc, "-O2", "-o", str(DRIVER), source, *extra, "-lcuda"], capture_output=True, text=True)
        if r.returncode == 0:
            return None
    return "nvcc failed: " + r.stderr.strip().splitlines()[-1]


def start_daemon() -> tuple[subprocess.Popen | None, str]:
    if importlib.util.find_spec("bcc") is None:
        return None, "no bcc here (source .bcc/env.sh)"
    log = open(WORK / "daemon.log", "w")
    proc = subprocess.Popen([*GPUWATCH, "run"], stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline and proc.poll() is None:
        if gw("status", "--json").returncode == 0:
            return proc, ""
        time.sleep(0.5)
    proc.kill()
    return None, "the daemon did not start: " + (WORK / "daemon.log").read_text()[-300:]


class Watch(threading.Thread):
    """Reads a run's stdout: its RESULT, and at MIDPOINT what the daemon's ps shows of the process (NVML is read
    every 0.25 s) and, where asked, a swap out and back through the daemon."""

    def __init__(self, proc: subprocess.Popen, run: Run, swap: bool) -> None:
        super().__init__(daemon=True)
        self.proc, self.run_, self.swap = proc, run, swap

    def run(self) -> None:
        assert self.proc.stdout and self.proc.stdin
        for line in self.proc.stdout:
            if line.startswith("RESULT "):
                self.run_.result = json.loads(line[7:])
            elif line.startswith("FAILED") or line.startswith("EXPORTED") or line.startswith("SWAPPED"):
                self.run_.detail = (self.run_.detail + " " + line.strip()).strip()
            elif line.strip() == "MIDPOINT":
                time.sleep(0.6)
                sample(self.proc.pid, self.run_)
                if self.swap:
                    pause = gw("pause", str(self.proc.pid), "--swap", timeout=120)
                    resume = gw("resume", str(self.proc.pid), timeout=120)
                    self.run_.swap = (pause.stdout + pause.stderr + " / " + resume.stdout + resume.stderr).strip()
                self.proc.stdin.write("go\n")
                self.proc.stdin.flush()


def sample(pid: int, run: Run) -> None:
    rows = [r for r in json.loads(gw("ps", "--json").stdout or "[]") if r["pid"] == pid]
    run.traced_bytes = max(run.traced_bytes, sum(r["device_bytes"] for r in rows))
    run.nvml_bytes = max(run.nvml_bytes, sum(r["nvml_bytes"] or 0 for r in rows))


def execute(case: Case, mode: str, daemon: bool) -> Run:
    env = {k: v for k, v in os.environ.items() if k not in ("LD_PRELOAD", "GW_COMPAT_SWAP")} | ENV | dict(case.env)
    argv = case.argv
    swap = mode == "exec" and case.state
    if mode == "exec":
        argv = [*GPUWATCH, "exec", *case.exec_args, "--", *argv]
    if daemon and mode != "plain":
        env["GW_COMPAT_SWAP"] = "daemon" if swap else "hold"  # the harness reads ps there, and swaps
    elif swap:
        env["GW_COMPAT_SWAP"] = "self"
    shown = " ".join(a if a != sys.executable else "python3" for a in argv).replace(str(ROOT) + "/", "")
    run = Run(mode, shown)
    start = time.monotonic()
    proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=env, cwd=ROOT, start_new_session=True)
    watch = Watch(proc, run, swap and daemon)
    watch.start()
    err: list[str] = []
    reader = threading.Thread(target=lambda: err.extend(proc.stderr or []), daemon=True)
    reader.start()
    while proc.poll() is None and time.monotonic() - start < case.timeout:
        if daemon and mode != "plain":
            sample(proc.pid, run)
        time.sleep(0.2)
    if proc.poll() is None:
        os.killpg(proc.pid, 9)
        run.detail = f"timed out after {case.timeout:.0f} s " + run.detail
    run.rc = proc.wait()
    watch.join(5)
    reader.join(5)
    run.seconds = round(time.monotonic() - start, 1)
    run.gpuwatch_said = [line.strip() for line in err if "gpuwatch" in line][:5]
    if run.result is None or run.rc:
        tail = [line.strip() for line in err if line.strip()][-3:]
        crashed = run.rc is None or run.rc < 0 or run.rc > 128 or "timed out" in run.detail
        documented = mode == "exec" and case.refused and not crashed
        run.verdict = "refused as documented" if documented else "fail"
        run.detail = (run.detail + " " + " | ".join(tail)).strip()[-600:]
    return run


def judge(case: Case, runs: list[Run]) -> None:
    plain = runs[0].result
    for r in runs:
        if r.verdict:
            continue
        if not case.compare or r.mode == "plain":
            r.verdict = "ran"
        else:
            r.verdict = "pass" if plain is not None and r.result and r.result["value"] == plain["value"] else "differs"


def table(report: dict[str, Any]) -> str:
    modes = ("plain", "daemon", "exec")
    lines = ["| case | what | " + " | ".join(modes) + " | notes |", "| --- | --- | --- | --- | --- | --- |"]
    for c in report["cases"]:
        runs = {r["mode"]: r for r in c["runs"]}
        cells = []
        for m in modes:
            r = runs.get(m)
            cells.append("-" if r is None else f"{r['verdict']} ({r['seconds']} s)")
        notes = []
        if c.get("skipped"):
            notes.append("skipped: " + c["skipped"])
        for r in c["runs"]:
            if r["verdict"] in ("fail", "differs", "refused as documented"):
                notes.append(f"{r['mode']}: {r['detail'] or r['result']}")
            notes.extend(f"{r['mode']} stderr: {line}" for line in r["gpuwatch_said"])
            if r["traced_bytes"] or r["nvml_bytes"]:
                traced, nvml = r["traced_bytes"] / 2**20, r["nvml_bytes"] / 2**20
                notes.append(f"{r['mode']}: traced {traced:.0f} MiB, NVML {nvml:.0f} MiB")
            if r["swap"]:
                notes.append("swap: " + r["swap"].replace("\n", " "))
            if not c["compare"] and r["result"]:
                notes.append(f"{r['mode']}: {json.dumps(r['result'])}")
        lines.append(f"| {c['name']} | {c['what']} | " + " | ".join(cells) + " | " + "<br>".join(notes) + " |")
    commands = ["", "Commands:", ""] + [f"- {c['name']} ({r['mode']}): `{r['command']}`" for c in report["cases"]
                                        for r in c["runs"]]
    head = [f"Versions: {json.dumps(report['versions'])}", f"Daemon: {report['daemon'] or 'running'}", ""]
    return "\n".join(head + lines + commands) + "\n"


def run_all(jobs: list[tuple[Case, str]], daemon: bool) -> dict[tuple[str, str], Run]:
    """Runs (case, mode) jobs, PARALLEL at a time (they share the GPU: results, not times, are compared), the
    timing cases one by one after the others."""
    done: dict[tuple[str, str], Run] = {}

    def one(job: tuple[Case, str]) -> None:
        case, mode = job
        r = done[case.name, mode] = execute(case, mode, daemon)
        print(f"{case.name} {mode}: {r.verdict or ('ok' if r.result else 'no result')} in {r.seconds} s", flush=True)

    with ThreadPoolExecutor(PARALLEL) as pool:
        list(pool.map(one, [j for j in jobs if not j[0].timing]))
    for job in (j for j in jobs if j[0].timing):
        one(job)
    return done


def main() -> int:
    chosen = set(sys.argv[1:])
    OUT.mkdir(parents=True, exist_ok=True)
    WORK.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    report: dict[str, Any] = {"versions": versions(), "cases": []}
    no_c = build()
    cases, skipped = [], {}
    for case in CASES:
        if chosen and case.name not in chosen:
            continue
        missing = [m for m in case.needs if importlib.util.find_spec(m) is None]
        skip = f"{', '.join(missing)} missing" if missing else no_c if case.argv[0] == str(DRIVER) else None
        if skip:
            skipped[case.name] = skip
        cases.append(case)
    ready = [c for c in cases if c.name not in skipped]
    runs = run_all([(c, "plain") for c in ready], False)  # before the daemon starts: no probes at all
    daemon, why = start_daemon()
    report["daemon"] = why
    try:
        modes = ("daemon", "exec") if daemon else ("exec",)
        runs |= run_all([(c, m) for c in ready for m in modes if m == "exec" or not c.timing], daemon is not None)
    finally:
        if daemon:
            daemon.terminate()
            daemon.wait(10)
    for case in cases:
        entry = asdict(case) | {"runs": []}
        if case.name in skipped:
            entry["skipped"] = skipped[case.name]
        else:
            mine = [runs[case.name, m] for m in ("plain", "daemon", "exec") if (case.name, m) in runs]
            judge(case, mine)
            entry["runs"] = [asdict(r) for r in mine]
        report["cases"].append(entry)
    report["seconds"] = round(time.monotonic() - started, 1)
    (OUT / "compat.json").write_text(json.dumps(report, indent=1) + "\n")
    (OUT / "compat.md").write_text(table(report))
    print((OUT / "compat.md").read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
